"""The `slurm` MLflow project backend: `mlflow run . --backend slurm --backend-config slurm.json -e ... -P
...`.

`mlflow run` creates the run and calls `SlurmBackend.run`, which checks the config against the cluster, writes
the job's spec and sbatch script, queues it and returns; the job (`rlvr.slurm.job`) runs the entry point in
that same run and keeps its status in step with SLURM. Credentials never touch a file: the job inherits them
from the submitting shell's environment.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.projects.backend.abstract_backend import AbstractBackend
from mlflow.projects.submitted_run import SubmittedRun
from mlflow.projects.utils import (
    PROJECT_ENV_MANAGER,
    PROJECT_STORAGE_DIR,
    fetch_and_validate_project,
    get_or_create_run,
    load_project,
)

from rlvr.slurm import cluster
from rlvr.slurm.cluster import JobFiles, SlurmError, run_status
from rlvr.slurm.config import SlurmConfig

JOB_ID_TAG = "slurm_job_id"  # the tag mlflow-slurm users already filter on
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_SLOTS = ("directives", "setup", "python", "job_dir")
_REQUIRED = ("directives", "job_dir")  # without these a template's job could neither log nor report


class SlurmBackend(AbstractBackend):
    """Queues each `mlflow run` as one sbatch job and returns at once, as MLflow expects of plugin
    backends."""

    def run(
        self,
        project_uri: str,
        entry_point: str,
        params: dict[str, Any] | None,
        version: str | None,
        backend_config: dict[str, Any],
        tracking_uri: str,
        experiment_id: str,
    ) -> SlurmSubmittedRun:
        config = SlurmConfig.from_backend_config(backend_config)
        config.check_environment(os.environ, cluster.partitions())
        params = dict(params or {})
        work_dir = fetch_and_validate_project(project_uri, version, entry_point, params)
        project = load_project(work_dir)
        project.get_entry_point(entry_point)  # an unknown entry point fails here, not in the queue
        template = config.template_text()
        _check_template(template, config.template)  # a broken template fails before the run exists
        run_id = get_or_create_run(
            None, project_uri, experiment_id, work_dir, version, entry_point, params
        ).info.run_id
        client = MlflowClient()
        try:
            files = JobFiles.for_run(run_id)
            files.write_spec(
                {
                    "run_id": run_id,
                    "experiment_id": str(experiment_id),
                    "project_dir": _project_dir_for_job(project_uri, work_dir, files),
                    "entry_point": entry_point,
                    "parameters": params,
                    "env_manager": backend_config.get(PROJECT_ENV_MANAGER),
                    "storage_dir": backend_config.get(PROJECT_STORAGE_DIR),
                }
            )
            script_path = config.script_file or files.script
            script_path.parent.mkdir(parents=True, exist_ok=True)
            script_path.write_text(_render(template, config, files, job_name=f"mlflow-{entry_point}"))
            client.update_run(run_id, status=RunStatus.to_string(RunStatus.SCHEDULED))
            job_id = cluster.submit(script_path, _job_environment(tracking_uri, experiment_id, run_id))
        except BaseException:
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
            raise
        client.set_tag(run_id, JOB_ID_TAG, job_id)
        print(
            f"=== Submitted SLURM job {job_id} for run {run_id}; the run follows the job (`squeue -j "
            f"{job_id}`), its log is {files.log} ===",
            file=sys.stderr,
        )
        return SlurmSubmittedRun(run_id, job_id, files)


class SlurmSubmittedRun(SubmittedRun):
    """A queued job as MLflow sees it: `mlflow.projects.run(..., synchronous=True)` waits through `wait`."""

    def __init__(self, run_id: str, job_id: str, files: JobFiles, poll_seconds: float = 5.0):
        super().__init__()
        self._run_id = run_id
        self.job_id = job_id
        self.files = files
        self.poll_seconds = poll_seconds

    @property
    def run_id(self) -> str:
        return self._run_id

    def get_status(self) -> str:
        """The MLflow status that the job's current SLURM state maps to."""
        return run_status(cluster.job_state(self.job_id, self.files))

    def wait(self) -> bool:
        """Block until the job has ended; True if it completed. Settles the run if the job never got to."""
        while not RunStatus.is_terminated(RunStatus.from_string(status := self.get_status())):
            time.sleep(self.poll_seconds)
        client = MlflowClient()
        if not RunStatus.is_terminated(RunStatus.from_string(client.get_run(self.run_id).info.status)):
            client.set_terminated(self.run_id, status)  # cancelled while queued, or its node died
        return status == RunStatus.to_string(RunStatus.FINISHED)

    def cancel(self) -> None:
        cluster.cancel(self.job_id)
        self.wait()


def _project_dir_for_job(project_uri: str, work_dir: str, files: JobFiles) -> str:
    """A local project runs where it is (on a filesystem the nodes share, like the job's working directory); a
    fetched one (Git, zip) is copied beside the job's files, since MLflow fetched it into a temporary
    directory that only this machine sees."""
    local = Path(project_uri.removeprefix("file://").split("#")[0]).expanduser()
    if local.is_dir() and Path(work_dir).resolve().is_relative_to(local.resolve()):
        return work_dir
    copy = files.root / "project"
    shutil.copytree(work_dir, copy, symlinks=True)
    return str(copy)


def _check_template(template: str, name: str) -> None:
    used = set(_PLACEHOLDER.findall(template))
    problems = [f"it lacks {{{{ {slot} }}}}" for slot in _REQUIRED if slot not in used]
    problems += [f"{{{{ {slot} }}}} is not a slot" for slot in sorted(used - set(_SLOTS))]
    if problems:
        raise SlurmError(
            f"sbatch template {name}: {'; '.join(problems)}. The slots are {', '.join(_SLOTS)}; start from "
            "rlvr/slurm/templates/default.sbatch."
        )


def _render(template: str, config: SlurmConfig, files: JobFiles, job_name: str) -> str:
    values = {
        "directives": "\n".join(
            [f"#SBATCH --job-name={job_name}", f"#SBATCH --output={files.log}", *config.directives()]
        ),
        "setup": "\n".join(config.setup()),
        "python": shlex.quote(sys.executable),
        "job_dir": shlex.quote(str(files.root)),
    }
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def _job_environment(tracking_uri: str, experiment_id: str, run_id: str) -> dict[str, str]:
    """The submitting shell's environment (credentials, HF_* and all) plus where the run lives."""
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_EXPERIMENT_ID": str(experiment_id),
        "MLFLOW_RUN_ID": run_id,
    }
