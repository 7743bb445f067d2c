"""Run names: a run that `mlflow run` created is named for its entry point, unless `main` named it for its step."""

import mlflow
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
