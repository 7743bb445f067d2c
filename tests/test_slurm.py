"""The SLURM backend on a real single-node cluster (`bash .ci/slurm-up`) with a real mlflow server: real jobs.

The cluster's one partition, `debug`, is not a default partition, so every config names it (and leaving it
out must fail before submission). The node has two CPUs, so two jobs run at a time: jobs are queued up front
and each test waits for its own with a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from conftest import ROOT
from mlflow import MlflowClient
from mlflow.exceptions import ExecutionException

from rlvr.slurm.backend import JOB_ID_TAG, SlurmSubmittedRun
from rlvr.slurm.cluster import JobFiles, SlurmError, run_status
from rlvr.slurm.config import SlurmConfig

pytestmark = pytest.mark.slow

PARTITION = "debug"
ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
}
SECRETS = {"HF_TOKEN": "hf_slurm_test_token_5e1d", "MLFLOW_TRACKING_PASSWORD": "slurm-test-password-9b2c"}

TOY_MLPROJECT = """\
name: slurm-toy
entry_points:
  main:
    parameters:
      value: {type: float, default: 1.0}
      sleep: {type: float, default: 0}
    command: "python toy.py --value {value} --sleep {sleep}"
"""
# Logs what it was given, and whether the submitting shell's secrets reached it, without ever printing them.
TOY_SCRIPT = f"""\
import argparse, os, time
import mlflow

parser = argparse.ArgumentParser()
parser.add_argument("--value", type=float)
parser.add_argument("--sleep", type=float)
args = parser.parse_args()
rank = os.environ.get("RANK", "0")
with mlflow.start_run():
    mlflow.log_metric(f"rank_{{rank}}", args.value)
    mlflow.log_metric("hf_token_seen", float(os.environ.get("HF_TOKEN") == {SECRETS["HF_TOKEN"]!r}))
    mlflow.log_metric(
        "tracking_password_seen",
        float(os.environ.get("MLFLOW_TRACKING_PASSWORD") == {SECRETS["MLFLOW_TRACKING_PASSWORD"]!r}),
    )
    print(f"toy rank {{rank}} started", flush=True)
    time.sleep(args.sleep)
"""


@pytest.fixture(scope="module")
def cluster() -> str:
    try:
        state = subprocess.run(
            ["sinfo", "-h", "-p", PARTITION, "-o", "%t"], check=False, capture_output=True, text=True
        ).stdout
    except FileNotFoundError:
        state = ""
    if state.strip() not in ("idle", "mix", "alloc"):
        missing = (
            f"no SLURM cluster with an up partition {PARTITION!r}; start one with `bash .ci/slurm-up` (root)"
        )
        if os.environ.get("RLVR_REQUIRE_SLURM") == "1":  # CI sets it: there a missing cluster is a failure
            pytest.fail(missing)
        pytest.skip(missing)
    return PARTITION


@pytest.fixture(scope="module")
def toy_project(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("slurm-toy")
    (project / "MLproject").write_text(TOY_MLPROJECT)
    (project / "toy.py").write_text(TOY_SCRIPT)
    return project


@dataclass
class Queued:
    """Jobs queued at module start, so that they run while earlier tests check theirs."""

    preprocess_run: str
    data_dir: Path
    sleeper: SlurmSubmittedRun
    distributed: SlurmSubmittedRun
    failing: Future  # (experiment, what `mlflow.projects.run(..., synchronous=True)` raised)
    train_run: Future  # train_reasoning's run id (two processes), submitted once preprocess has finished


@pytest.fixture(scope="module")
def queued(cluster, mlflow_server, toy_project, tmp_path_factory) -> Queued:
    workdir = tmp_path_factory.mktemp("slurm")
    data_dir = workdir / "data"
    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(max_workers=2) as background:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        preprocess = _mlflow_run_cli(
            ROOT,
            "preprocess",
            {"source": "synthetic:count=64", "output_dir": str(data_dir)},
            {"partition": cluster},
            workdir,
        )
        zipped = shutil.make_archive(str(workdir / "toy"), "zip", toy_project)  # fetched like a Git URI
        sleeper = _submit(Path(zipped), {"sleep": 600}, {"partition": cluster})
        preprocess_run = _submitted_run_id(preprocess)
        with patch.context() as secret:
            for name, value in SECRETS.items():
                secret.setenv(name, value)
            distributed = _submit(
                toy_project,
                {"value": 3},
                {
                    "partition": cluster,
                    "sbatch-template": "accelerate",
                    "environment": ["RLVR_PROCESSES_PER_NODE=2"],
                    "exports": ["HF_TOKEN"],
                },
            )
        # train_reasoning queues the moment its data exists; the failing run queues behind it, off its path.
        train_run = background.submit(_train_after, preprocess_run, data_dir, cluster, workdir)
        failing = background.submit(_failing_preprocess, cluster, workdir / "bad", train_run)
        yield Queued(preprocess_run, data_dir, sleeper, distributed, failing, train_run)


def _failing_preprocess(
    partition: str, output_dir: Path, after: Future
) -> tuple[str, ExecutionException | None]:
    """A bad parameter (test_size=-1), run the way a script waits for a SLURM run: synchronous=True."""
    after.result()
    experiment = _experiment()
    try:
        mlflow.projects.run(
            str(ROOT),
            "preprocess",
            parameters={"source": "synthetic", "test_size": -1, "output_dir": str(output_dir)},
            backend="slurm",
            backend_config={"partition": partition},
            env_manager="local",
            experiment_name=experiment,
            synchronous=True,
        )
    except ExecutionException as error:
        return experiment, error
    return experiment, None


def _train_after(preprocess_run: str, data_dir: Path, partition: str, workdir: Path) -> str:
    """train_reasoning in two processes (the accelerate template on CPUs: torchrun, gloo) once data exists."""
    assert _wait_for_job(preprocess_run) == "COMPLETED"
    params = {
        "model": "micro", "data": str(data_dir), "reasoning_vocab_size": 64, "max_steps": 2,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "num_generations": 2,
        "max_completion_length": 12, "log_completions_steps": 1, "save_steps": 1,
        "registered_model_name": "slurm-two-processes", "output_dir": str(workdir / "train"),
    }  # fmt: skip
    config = {
        "partition": partition,
        "sbatch-template": "accelerate",
        "environment": ["RLVR_PROCESSES_PER_NODE=2"],
    }
    return _submit(ROOT, params, config, entry_point="train_reasoning").run_id


def _experiment() -> str:
    return f"slurm-{uuid.uuid4().hex[:8]}"


def _submit(project: Path, params: dict, config: dict, entry_point: str = "main") -> SlurmSubmittedRun:
    """What `mlflow run --backend slurm` calls, in this process: it returns at submission."""
    return mlflow.projects.run(
        str(project),
        entry_point,
        parameters=params,
        backend="slurm",
        backend_config=config,
        env_manager="local",
        experiment_name=_experiment(),
        synchronous=False,
    )


def _mlflow_run_cli(
    project: Path, entry_point: str, params: dict, config: dict, workdir: Path
) -> tuple[subprocess.Popen, str]:
    """`mlflow run --backend slurm` as a user types it, config in a JSON file; it returns at submission."""
    experiment = _experiment()
    config_file = workdir / f"{experiment}.json"
    config_file.write_text(json.dumps(config))
    command = [
        sys.executable, "-m", "mlflow", "run", str(project), "-e", entry_point, "--backend", "slurm",
        "--backend-config", str(config_file), "--env-manager", "local", "--experiment-name", experiment,
    ]  # fmt: skip
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), experiment


def _submitted_run_id(submission: tuple[subprocess.Popen, str]) -> str:
    process, experiment = submission
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 0, output
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, output
    return runs[0].info.run_id


def _job_id(run_id: str) -> str:
    return MlflowClient().get_run(run_id).data.tags[JOB_ID_TAG]


def _job_state(job_id: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], check=False, capture_output=True, text=True
    ).stdout.strip()


def _wait_for_job(run_id: str, timeout: float = 240) -> str:
    """The job's final SLURM state, read from squeue (not from the code under test)."""
    job_id = _job_id(run_id)
    deadline = time.monotonic() + timeout
    while (state := _job_state(job_id)) not in ENDED:
        if time.monotonic() > deadline:
            log = JobFiles.for_run(run_id).log
            pytest.fail(
                f"job {job_id} still {state} after {timeout}s:\n{log.read_text() if log.exists() else ''}"
            )
        time.sleep(1)
    return state


def _wait_until(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


def _attached_log(run_id: str, tmp_path: Path) -> str:
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="slurm/job.log", dst_path=str(tmp_path)
    )
    return Path(local).read_text()


def test_a_queued_job_is_scheduled_and_cancelling_it_ends_the_run_killed(queued, toy_project, cluster):
    # The sleeper holds one CPU, so a job that wants the whole node stays PENDING until it is cancelled.
    _wait_until(lambda: _job_state(queued.sleeper.job_id) == "RUNNING", "the sleeper to start")
    waiting = _submit(toy_project, {}, {"partition": cluster, "exclusive": True})
    assert _job_state(waiting.job_id) == "PENDING"
    assert waiting.get_status() == "SCHEDULED"
    assert MlflowClient().get_run(waiting.run_id).info.status == "SCHEDULED"

    waiting.cancel()  # never started, so no job process can report: the submitted run settles the run itself

    assert _job_state(waiting.job_id) == "CANCELLED"
    assert MlflowClient().get_run(waiting.run_id).info.status == "KILLED"


def test_a_fetched_project_runs_from_a_copy_beside_the_job_files(queued):
    files = JobFiles.for_run(queued.sleeper.run_id)
    assert files.read_spec()["project_dir"] == str(files.root / "project")  # not this machine's temp dir
    _wait_until(
        lambda: files.log.exists() and "toy rank 0 started" in files.log.read_text(), "the entry point"
    )


def test_scancel_of_a_running_job_ends_its_run_killed_with_the_log(queued, tmp_path):
    run_id, job_id = queued.sleeper.run_id, queued.sleeper.job_id
    log = JobFiles.for_run(run_id).log
    _wait_until(lambda: log.exists() and "toy rank 0 started" in log.read_text(), "the entry point to start")
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"
    assert queued.sleeper.get_status() == "RUNNING"

    subprocess.run(["scancel", job_id], check=True)

    assert _wait_for_job(run_id) == "CANCELLED"
    assert MlflowClient().get_run(run_id).info.status == "KILLED"
    assert queued.sleeper.get_status() == "KILLED"
    assert "CANCELLED" in _attached_log(run_id, tmp_path)


def test_mlflow_run_preprocess_reaches_finished_with_the_jobs_metrics(queued, tmp_path):
    run_id = queued.preprocess_run
    assert _wait_for_job(run_id) == "COMPLETED"
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.backend"] == "slurm"
    assert run.data.tags[JOB_ID_TAG] == _job_id(run_id)
    assert run.data.metrics["rows_read"] == 64  # logged by the job, into the run `mlflow run` created
    assert (queued.data_dir / "train.parquet").exists()
    assert "=== Running command 'python -m entrypoints.preprocess" in _attached_log(run_id, tmp_path)


def test_train_reasoning_in_two_processes_reaches_finished_in_one_run(queued, tmp_path):
    run_id = queued.train_run.result(timeout=300)
    assert _wait_for_job(run_id, timeout=300) == "COMPLETED"
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]  # mlflow run's
    for name in ("loss", "reward", "reasoning/token_share"):  # logged by the job's rank 0, once per step
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == [1, 2], name
    (version,) = client.search_model_versions("name='slurm-two-processes'")
    assert version.run_id == run_id
    table = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="completions/step_000001.json", dst_path=str(tmp_path)
    )
    loaded = json.loads(Path(table).read_text())
    ranks = [row[loaded["columns"].index("rank")] for row in loaded["data"]]
    assert sorted(ranks) == [0, 0, 1, 1]  # both processes sampled, rank 0 logged


def test_accelerate_template_runs_one_process_per_slot_and_passes_credentials(queued, tmp_path):
    run_id = queued.distributed.run_id
    assert _wait_for_job(run_id) == "COMPLETED"
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["rank_0"] == run.data.metrics["rank_1"] == 3  # two processes, one run
    assert run.data.metrics["hf_token_seen"] == run.data.metrics["tracking_password_seen"] == 1
    log = _attached_log(run_id, tmp_path)
    assert "toy rank 1 started" in log
    written = [log, json.dumps(run.data.params), json.dumps(run.data.tags)]
    written += [path.read_text() for path in JobFiles.for_run(run_id).root.iterdir()]
    for secret in SECRETS.values():
        assert not any(secret in text for text in written)


def test_a_failing_job_ends_failed_with_its_log_and_a_synchronous_run_waits_for_it(queued, tmp_path):
    experiment, raised = queued.failing.result(timeout=300)
    assert raised is not None and "failed" in str(raised)  # MLflow's own wait, through the submitted run
    (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(experiment).experiment_id])
    assert _job_state(run.data.tags[JOB_ID_TAG]) == "FAILED"
    assert run.info.status == "FAILED"
    assert "test_size=-1.0 is neither a fraction" in _attached_log(run.info.run_id, tmp_path)


def test_a_job_that_left_the_queue_is_resolved_from_what_it_recorded(queued):
    run_id = queued.preprocess_run
    assert _wait_for_job(run_id) == "COMPLETED"
    files = JobFiles.for_run(run_id)
    forgotten = "99999999"  # no such job in the controller, and this cluster keeps no accounting
    assert _job_state(forgotten) == ""
    assert SlurmSubmittedRun(run_id, forgotten, files).get_status() == "FINISHED"
    assert (
        SlurmSubmittedRun(run_id, forgotten, JobFiles(files.root / "nothing-recorded")).get_status()
        == "FAILED"
    )


def test_an_unknown_config_key_fails_mlflow_run_before_submission(
    cluster, mlflow_server, toy_project, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    process, experiment = _mlflow_run_cli(toy_project, "main", {}, {"partiton": cluster}, tmp_path)
    output, _ = process.communicate(timeout=180)
    assert process.returncode != 0
    assert "unknown key 'partiton'; did you mean 'partition'?" in output
    assert "Traceback" not in output
    _assert_no_run(mlflow_server, experiment)


@pytest.mark.parametrize(
    "config, message",
    [
        ({}, "no 'partition' and this cluster has no default partition; add \"partition\": one of debug"),
        ({"partition": "gpu"}, "no partition 'gpu'; use one of debug"),
        ({"partition": PARTITION, "nodes": "two"}, "'nodes' must be a positive whole number"),
        ({"partition": PARTITION, "modules": "cuda"}, "'modules' must be a list of non-empty strings"),
        ({"partition": PARTITION, "environment": ["no assignment"]}, "is not a NAME=value assignment"),
        (
            {"partition": PARTITION, "exports": ["RLVR_UNSET_FOR_TEST"]},
            "names RLVR_UNSET_FOR_TEST, which this shell",
        ),
        ({"partition": PARTITION, "sbatch-template": "nope"}, "neither a built-in template"),
    ],
)
def test_a_bad_backend_config_is_one_clear_error_before_submission(
    config, message, cluster, mlflow_server, toy_project, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("SBATCH_PARTITION", raising=False)
    experiment = _experiment()
    with pytest.raises(SlurmError) as raised:
        mlflow.projects.run(
            str(toy_project), "main", backend="slurm", backend_config=config, env_manager="local",
            experiment_name=experiment, synchronous=False,
        )  # fmt: skip
    assert message in str(raised.value)
    _assert_no_run(mlflow_server, experiment)


def test_a_template_without_the_job_slot_is_refused_before_submission(
    cluster, mlflow_server, toy_project, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    template = tmp_path / "mine.sbatch"
    template.write_text("#!/bin/bash\n{{ directives }}\nsrun python train.py\n")
    experiment = _experiment()
    with pytest.raises(SlurmError, match=r"it lacks \{\{ job_dir \}\}"):
        mlflow.projects.run(
            str(toy_project), "main", backend="slurm", env_manager="local", experiment_name=experiment,
            backend_config={"partition": cluster, "sbatch-template": str(template)}, synchronous=False,
        )  # fmt: skip
    _assert_no_run(mlflow_server, experiment)


def _assert_no_run(tracking: str, experiment: str) -> None:
    found = MlflowClient(tracking).get_experiment_by_name(experiment)
    assert found is None or not MlflowClient(tracking).search_runs([found.experiment_id])


def test_config_keys_become_sbatch_directives_and_setup_lines():
    config = SlurmConfig.from_backend_config(
        {
            "partition": "gpu",
            "account": "proj42",
            "gres": "gpu:a100:4",
            "gpus_per_node": "4",
            "mem": "64G",
            "time": "02:00:00",
            "nodes": 2,
            "ntasks": 1,
            "exclusive": True,
            "modules": ["cuda/12.4"],
            "environment": ["OMP_NUM_THREADS=8"],
            "exports": ["HF_TOKEN"],
            "sbatch-script-file": "train.sbatch",
            "ENV_MANAGER": "local",
            "SYNCHRONOUS": False,
            "DOCKER_ARGS": {},
            "STORAGE_DIR": None,
            "build_image": False,
            "docker_auth": None,
        }
    )
    assert config.directives() == [
        "#SBATCH --partition=gpu", "#SBATCH --account=proj42", "#SBATCH --gres=gpu:a100:4",
        "#SBATCH --gpus-per-node=4", "#SBATCH --mem=64G", "#SBATCH --time=02:00:00", "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1", "#SBATCH --exclusive",
    ]  # fmt: skip
    assert config.setup() == ["module load cuda/12.4", "export OMP_NUM_THREADS=8"]
    assert config.script_file == Path("train.sbatch")


@pytest.mark.parametrize(
    "job_state, status",
    [("PENDING", "SCHEDULED"), ("RUNNING", "RUNNING"), ("COMPLETING", "RUNNING"), ("COMPLETED", "FINISHED"),
     ("FAILED", "FAILED"), ("TIMEOUT", "FAILED"), ("OUT_OF_MEMORY", "FAILED"), ("CANCELLED", "KILLED"),
     ("UNKNOWN", "FAILED")],
)  # fmt: skip
def test_job_states_map_to_run_statuses(job_state, status):
    assert run_status(job_state) == status
