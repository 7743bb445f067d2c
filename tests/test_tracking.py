"""Run names and experiments: a run that `mlflow run` created is named for its entry point, unless `main`
named it for its step; `main` lands in its own experiment unless the user names one. A training's `final/`
appears only once its model is logged and registered."""

import os
import socket
import subprocess
import sys
import uuid
from types import SimpleNamespace

import mlflow
import pytest
from conftest import ROOT
from mlflow.tracking import MlflowClient

from rlvr.errors import InputError
from rlvr.tracking import runs


@pytest.fixture
def store(tracking_uri, monkeypatch):
    """The session's tracking server, and an environment that names no experiment and no run."""
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    return MlflowClient()


@pytest.fixture
def demo():
    """The experiment `main` would own (`rlvr-demo`), named afresh per test since the server is shared."""
    return f"rlvr-demo-{uuid.uuid4().hex[:8]}"


def launched_by_mlflow_run(client, monkeypatch, experiment_id: str) -> str:
    """A run as `mlflow run` creates and hands it on: a random name; its id and experiment in the env."""
    tags = {"mlflow.project.entryPoint": "main"}
    run = client.create_run(experiment_id, run_name="brave-owl-123", tags=tags)
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    return run.info.run_id


def run_main(demo: str) -> mlflow.entities.Run:
    with runs.entrypoint_run("main", tags={"rlvr.step": "main"}, default_experiment=demo) as run:
        # fluent calls without an experiment (main's mlflow.load_table) look in the run's experiment
        assert run.info.run_id in {r.info.run_id for r in mlflow.search_runs(output_format="list")}
    assert mlflow.active_run() is None
    return MlflowClient().get_run(run.info.run_id)


def test_a_run_created_by_mlflow_run_takes_the_entry_points_name_but_step_names_stay(store, monkeypatch):
    client = store
    experiment = client.create_experiment(f"names-{uuid.uuid4().hex[:8]}")
    plain = client.create_run(experiment, run_name="brave-owl-123")  # as `mlflow run` creates it
    step = client.create_run(experiment, run_name="evaluate warmstart", tags={"rlvr.step_key": "abc"})
    for run, expected in ((plain, "train_baseline"), (step, "evaluate warmstart")):
        monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
        with runs.entrypoint_run("train_baseline", tags={"rlvr.step": "train_baseline"}):
            pass
        assert mlflow.active_run() is None
        assert client.get_run(run.info.run_id).info.run_name == expected
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)  # mlflow pops it once used
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)
    with runs.entrypoint_run("evaluate") as run:
        own = run.info.run_id
    assert client.get_run(own).info.run_name == "evaluate"


def test_a_model_that_could_not_be_registered_leaves_no_finished_looking_output(tmp_path, monkeypatch):
    """`final/` marks a finished training; a job whose model did not reach the registry stays resumable."""
    from mlflow.exceptions import MlflowException

    from rlvr.job import Job
    from rlvr.models import load_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    job = Job(str(tmp_path / "out"), run_name="train_baseline", tags={})
    with pytest.raises(MlflowException, match="Invalid model name"), job.run():
        model, tokenizer = job.starting_model(lambda: load_model("micro"))
        accelerator = SimpleNamespace(get_state_dict=lambda m: m.state_dict(), unwrap_model=lambda m: m)
        trainer = SimpleNamespace(accelerator=accelerator, model=model, model_wrapped=model)  # one process
        job.finish(trainer, tokenizer, "not/a/name", {"arm": "baseline"})
    assert not (tmp_path / "out" / "final").exists() and mlflow.active_run() is None
    assert Job(str(tmp_path / "out"), run_name="train_baseline", tags={}).output_dir.exists()  # not refused


def test_main_launched_in_default_moves_to_its_own_experiment_leaving_a_pointer(store, demo, monkeypatch):
    client = store
    launched = launched_by_mlflow_run(client, monkeypatch, runs.DEFAULT_EXPERIMENT_ID)
    real = run_main(demo)
    own = client.get_experiment_by_name(demo).experiment_id
    assert real.info.experiment_id == own and real.info.run_name == "main"
    assert real.info.status == "FINISHED" and real.data.tags["rlvr.step"] == "main"
    assert real.data.tags["mlflow.project.entryPoint"] == "main"  # the project's tags follow the work
    pointer = client.get_run(launched)
    assert pointer.info.experiment_id == runs.DEFAULT_EXPERIMENT_ID
    assert pointer.info.run_name == f"main (in experiment {demo})"
    assert pointer.data.tags[runs.MOVED_TO] == real.info.run_id and "rlvr.step" not in pointer.data.tags
    assert pointer.info.status == "RUNNING"  # left to `mlflow run`, which closes the run it created
    assert pointer.data.tags[runs.PROCESS] == runs.this_process()

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pointer whose `mlflow run` and main were killed: RUNNING, its process gone
    orphan = client.create_run(
        runs.DEFAULT_EXPERIMENT_ID,
        run_name=f"main (in experiment {demo})",
        tags={runs.MOVED_TO: real.info.run_id, runs.PROCESS: f"{socket.gethostname()}/{gone.pid}"},
    )
    second = launched_by_mlflow_run(client, monkeypatch, runs.DEFAULT_EXPERIMENT_ID)
    assert run_main(demo).info.experiment_id == own  # the experiment exists now: reused
    assert client.get_run(second).data.tags[runs.MOVED_TO] != real.info.run_id
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert client.get_run(launched).info.status == "RUNNING"  # its process (this one) is alive
    for pointer_id in (launched, second):
        client.set_terminated(pointer_id)  # as `mlflow run` does when its command ends


def test_an_experiment_the_user_names_wins(store, demo, monkeypatch):
    client = store
    mine = client.create_experiment("mine")
    launched = launched_by_mlflow_run(client, monkeypatch, mine)  # mlflow run --experiment-name mine
    assert run_main(demo).info.run_id == launched
    assert client.get_run(launched).info.run_name == "main"

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "Default")  # the Default experiment, named on purpose
    launched = launched_by_mlflow_run(client, monkeypatch, runs.DEFAULT_EXPERIMENT_ID)
    run = run_main(demo)
    assert run.info.run_id == launched and run.info.experiment_id == runs.DEFAULT_EXPERIMENT_ID
    assert runs.MOVED_TO not in run.data.tags

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)  # python -m entrypoints.main (mlflow popped it)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "by-name")
    assert run_main(demo).info.experiment_id == client.get_experiment_by_name("by-name").experiment_id
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", mine)
    assert run_main(demo).info.experiment_id == mine
    assert client.get_experiment_by_name(demo) is None


def test_main_outside_mlflow_run_uses_its_experiment_and_refuses_a_deleted_one(store, demo):
    client = store
    run = run_main(demo)
    own = client.get_experiment_by_name(demo).experiment_id
    assert run.info.experiment_id == own and run.info.run_name == "main"
    client.delete_experiment(own)
    with pytest.raises(InputError, match=f"experiment '{demo}' is deleted; restore it"):
        run_main(demo)
    assert mlflow.active_run() is None


def test_mlflow_run_of_main_in_default_ends_cleanly_with_the_work_in_its_experiment(store, demo, tmp_path):
    """The real `mlflow run`: the run it created ends FINISHED as a pointer; the work sits in `rlvr-demo`."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "MLproject").write_text("name: moved\nentry_points:\n  main:\n    command: python step.py\n")
    (project / "step.py").write_text(
        "from rlvr.tracking import runs\n"
        f"with runs.entrypoint_run('main', default_experiment={demo!r}):\n"
        "    pass\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(project), "--env-manager", "local"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = store
    (pointer,) = client.search_runs(
        [runs.DEFAULT_EXPERIMENT_ID], f"tags.`mlflow.runName` = 'main (in experiment {demo})'"
    )
    assert pointer.info.status == "FINISHED" and pointer.info.run_name == f"main (in experiment {demo})"
    real = client.get_run(pointer.data.tags[runs.MOVED_TO])
    assert real.info.status == "FINISHED" and real.info.run_name == "main"
    assert real.info.experiment_id == client.get_experiment_by_name(demo).experiment_id
