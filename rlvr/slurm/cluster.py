"""Talking to SLURM through its commands (sbatch, squeue, sacct, scontrol, scancel), and the files a job
leaves.

A job's state comes from `squeue` while the controller remembers the job (`MinJobAge` after it ends), then
from `sacct` where accounting runs, and else from the state the job itself recorded on exit: so a run is
resolved however long ago its job left the queue, on clusters with or without accounting.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import RunStatus
from mlflow.exceptions import ExecutionException

from rlvr.cache import cache_dir
from rlvr.errors import UserFacingError

_QUEUED = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD"}
_ACTIVE = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED", "RESIZING"}
_OUTCOMES = {"COMPLETED": RunStatus.FINISHED, "CANCELLED": RunStatus.KILLED}


class SlurmError(ExecutionException, UserFacingError):
    """SLURM cannot take the job as configured; `mlflow run` prints the message and exits non-zero."""


def run_status(job_state: str) -> str:
    """The MLflow run status that mirrors a SLURM job state; any ending but success or cancellation is a
    failure."""
    if job_state in _QUEUED:
        return RunStatus.to_string(RunStatus.SCHEDULED)
    if job_state in _ACTIVE:
        return RunStatus.to_string(RunStatus.RUNNING)
    return RunStatus.to_string(_OUTCOMES.get(job_state, RunStatus.FAILED))


@dataclass(frozen=True)
class JobFiles:
    """The files of one run's job, in a directory that the login node and the compute nodes both see."""

    root: Path

    @classmethod
    def for_run(cls, run_id: str) -> JobFiles:
        return cls(cache_dir() / "slurm" / run_id)

    @property
    def spec(self) -> Path:
        return self.root / "job.json"

    @property
    def script(self) -> Path:
        return self.root / "job.sbatch"

    @property
    def log(self) -> Path:
        return self.root / "job.log"

    @property
    def outcome(self) -> Path:
        return self.root / "outcome.json"

    @property
    def lock(self) -> Path:
        return self.root / "environment.lock"

    def write_spec(self, spec: Mapping[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.spec.write_text(json.dumps(spec, indent=2))

    def read_spec(self) -> dict[str, Any]:
        return json.loads(self.spec.read_text())

    def record_outcome(self, job_state: str) -> None:
        """Written by the job as it exits: the only trace of its end once it has left a queue without
        accounting."""
        partial = self.outcome.with_suffix(".partial")
        partial.write_text(json.dumps({"state": job_state}))
        partial.replace(self.outcome)

    def recorded_outcome(self) -> str | None:
        if not self.outcome.exists():
            return None
        return json.loads(self.outcome.read_text())["state"]


def slurm(args: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(args), check=False, capture_output=True, text=True, env=env, timeout=60)
    except FileNotFoundError as error:
        raise SlurmError(
            f"`{args[0]}` is not installed here; submit from a SLURM login node (one where `sinfo` works)."
        ) from error


def partitions() -> dict[str, bool]:
    """Each partition of the cluster, and whether it is the default one."""
    shown = slurm(["scontrol", "show", "partition", "--oneliner"])
    if shown.returncode != 0:
        raise SlurmError(
            f"the SLURM controller did not answer ({shown.stderr.strip()}); check `sinfo` works on this "
            "machine."
        )
    found = {}
    for line in shown.stdout.splitlines():
        fields = _fields(line)
        if "PartitionName" in fields:
            found[fields["PartitionName"]] = fields.get("Default") == "YES"
    return found


def submit(script: Path, env: Mapping[str, str]) -> str:
    """Queue the script; the job inherits `env` (credentials included) through `--export=ALL`.

    `--export=ALL` is given here rather than in the script because a site-wide `SBATCH_EXPORT` would override
    the script's directive, and the job cannot reach MLflow without the tracking variables.
    """
    queued = slurm(["sbatch", "--parsable", "--export=ALL", str(script)], env=env)
    if queued.returncode != 0:
        raise SlurmError(
            f"sbatch refused the job: {queued.stderr.strip()}. Fix the backend config and resubmit."
        )
    return queued.stdout.strip().split(";")[0]


def cancel(job_id: str) -> None:
    cancelled = slurm(["scancel", job_id])
    if cancelled.returncode != 0:
        raise SlurmError(f"scancel {job_id} failed: {cancelled.stderr.strip()}")


def job_state(job_id: str, files: JobFiles) -> str:
    """The job's SLURM state, also long after it left the queue; UNKNOWN if nothing recorded its end."""
    queued = slurm(["squeue", "--noheader", "--states=all", "--jobs", job_id, "--format=%T"])
    if queued.returncode == 0 and queued.stdout.strip():
        return queued.stdout.split()[0]
    if queued.returncode != 0 and "Invalid job id" not in queued.stderr:
        raise SlurmError(f"squeue could not report job {job_id}: {queued.stderr.strip()}")
    accounted = slurm(
        ["sacct", "--noheader", "--allocations", "--parsable2", "--jobs", job_id, "--format=State"]
    )
    if accounted.returncode == 0 and accounted.stdout.strip():
        return accounted.stdout.split()[0]  # "CANCELLED by 1000" names who cancelled
    return files.recorded_outcome() or "UNKNOWN"


def ending_state(job_id: str) -> str:
    """Why a job's processes were sent SIGTERM: SLURM is ending the job (TIMEOUT, CANCELLED) or, while SLURM
    still counts it RUNNING, a process inside the job gave up on the others (a failed rank's launcher):
    FAILED."""
    shown = slurm(["scontrol", "show", "job", "--oneliner", job_id])
    fields = _fields(shown.stdout) if shown.returncode == 0 else {}
    if fields.get("JobState") == "RUNNING":
        return "FAILED"
    if fields.get("Reason") == "TimeLimit":
        return "TIMEOUT"
    return "CANCELLED"


def _fields(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split() if "=" in item)
