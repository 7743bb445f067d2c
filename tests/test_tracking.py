"""Run names: a run that `mlflow run` created is named for its entry point, unless `main` named it for its
step. A training's `final/` appears only once its model is logged and registered."""

from types import SimpleNamespace

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from rlvr import tracking


def test_a_run_created_by_mlflow_run_takes_the_entry_points_name_but_mains_step_names_stay(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.create_experiment("names")
    plain = client.create_run(experiment, run_name="brave-owl-123")  # as `mlflow run` creates it
    step = client.create_run(experiment, run_name="evaluate warmstart", tags={"rlvr.step_key": "abc"})
    for run, expected in ((plain, "train_baseline"), (step, "evaluate warmstart")):
        monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
        with tracking.entrypoint_run("train_baseline", tags={"rlvr.step": "train_baseline"}):
            pass
        assert mlflow.active_run() is None
        assert client.get_run(run.info.run_id).info.run_name == expected
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)  # mlflow pops it once used
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)
    with tracking.entrypoint_run("evaluate") as run:
        own = run.info.run_id
    assert client.get_run(own).info.run_name == "evaluate"


def test_a_model_that_could_not_be_registered_leaves_no_finished_looking_output(tmp_path, monkeypatch):
    """`final/` marks a finished training; a job whose model did not reach the registry stays resumable."""
    from mlflow.exceptions import MlflowException

    from rlvr.models import load_model
    from rlvr.training import Job

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
