"""What runs inside the allocation: the run's entry point, with the MLflow run mirroring the job.

The sbatch script starts `python -m rlvr.slurm.job JOB_DIR`. MLflow's own local backend then builds the
environment (`--env-manager local`, conda, virtualenv or uv, on the compute node) and runs the entry point
in the run that `mlflow run` created, so the job behaves exactly like `mlflow run` on that node. Around it
this process marks the run RUNNING, and on exit records the job's outcome (for clusters without accounting),
attaches the job log and sets FINISHED, FAILED or KILLED.

Under `accelerate launch` one copy runs per process; only global rank 0 reports, so the run gets one status.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from mlflow import MlflowClient
from mlflow.projects.backend.local import LocalBackend
from mlflow.projects.utils import (
    MLFLOW_LOCAL_BACKEND_RUN_ID_CONFIG,
    PROJECT_BUILD_IMAGE,
    PROJECT_DOCKER_ARGS,
    PROJECT_DOCKER_AUTH,
    PROJECT_ENV_MANAGER,
    PROJECT_STORAGE_DIR,
    PROJECT_SYNCHRONOUS,
)

from rlvr.slurm.cluster import JobFiles, ending_state, run_status

LOG_ARTIFACT_DIR = "slurm"


class _Signalled(Exception):
    """SIGTERM reached this process: SLURM is ending the job (scancel, time limit), or a launcher its
    processes."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean-up, however many signals follow
    raise _Signalled()


def run_job(files: JobFiles) -> int:
    """Run the entry point of `files.spec`; return the job's exit code."""
    spec = files.read_spec()
    run_id = spec["run_id"]
    reporter = os.environ.get("RANK", "0") == "0"
    client = MlflowClient()
    signal.signal(signal.SIGTERM, _on_sigterm)
    submitted = None
    try:
        if reporter:
            client.update_run(run_id, status="RUNNING")
        with files.lock.open("a") as lock:
            # The processes of one job build a conda/virtualenv environment once, one after the other.
            fcntl.flock(lock, fcntl.LOCK_EX)
            submitted = LocalBackend().run(
                spec["project_dir"],
                spec["entry_point"],
                spec["parameters"],
                None,
                {
                    MLFLOW_LOCAL_BACKEND_RUN_ID_CONFIG: run_id,
                    PROJECT_ENV_MANAGER: spec["env_manager"],
                    PROJECT_STORAGE_DIR: spec["storage_dir"],
                    PROJECT_SYNCHRONOUS: True,
                    PROJECT_DOCKER_ARGS: {},
                    PROJECT_BUILD_IMAGE: False,
                    PROJECT_DOCKER_AUTH: None,
                },
                client.tracking_uri,
                spec["experiment_id"],
            )
        state = "COMPLETED" if submitted.wait() else "FAILED"
    except _Signalled:
        if submitted is not None:
            submitted.cancel()
        state = ending_state(os.environ["SLURM_JOB_ID"])
    except Exception:  # noqa: BLE001
        # Whatever broke (an environment that cannot be built, ...) still ends the run FAILED, with the
        # traceback in the job log that is attached below.
        traceback.print_exc()
        state = "FAILED"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a cancellation now must not cut the report short
    if reporter:
        _wait_for_other_ranks(files)
        _report(client, run_id, files, state)
    else:
        files.root.joinpath(f"rank-{os.environ['RANK']}.done").touch()
    return {"COMPLETED": 0, "FAILED": 1}.get(state, 128 + signal.SIGTERM)


def _wait_for_other_ranks(files: JobFiles, timeout: float = 120.0) -> None:
    """Until every other process has ended its entry point (or `timeout`), so the attached log has their
    output."""
    others = int(os.environ.get("WORLD_SIZE", "1")) - 1
    deadline = time.monotonic() + timeout
    while len(list(files.root.glob("rank-*.done"))) < others and time.monotonic() < deadline:
        time.sleep(0.5)


def _report(client: MlflowClient, run_id: str, files: JobFiles, state: str) -> None:
    """Outcome file first (local and instant), then the log, then the status, so a terminal run has its log.

    The log is a convenience: when it cannot be attached the run still gets the entry point's outcome, and the
    log stays in the job directory.
    """
    files.record_outcome(state)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        client.log_artifact(run_id, str(files.log), LOG_ARTIFACT_DIR)
    except Exception as error:  # noqa: BLE001 - any artifact store, any failure
        print(f"rlvr.slurm: could not attach {files.log} to run {run_id}: {error}", file=sys.stderr)
    client.set_terminated(run_id, run_status(state))


if __name__ == "__main__":
    sys.exit(run_job(JobFiles(Path(sys.argv[1]))))
