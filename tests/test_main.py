"""The `main` pipeline at CI scale through `mlflow run`, against a real tracking server."""

import subprocess
import sys

from conftest import ROOT
from mlflow.tracking import MlflowClient

STEPS = ["evaluate", "evaluate", "evaluate", "preprocess", "train_baseline", "train_reasoning", "warmstart"]


def mlflow_run(tmp_path, experiment: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mlflow", "run", ".", "--env-manager", "local", "--experiment-name", experiment,
               "-P", "scale=ci", "-P", f"output_dir={tmp_path / 'main'}", "-P", "registered_model_name=ci-demo"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500, check=False)


def test_main_runs_every_step_as_a_child_sets_the_champion_and_reuses_finished_steps(tracking_uri, tmp_path):
    experiment = "main-ci"
    first = mlflow_run(tmp_path, experiment)
    assert first.returncode == 0, first.stderr[-5000:]
    assert "| model | accuracy" in first.stdout and "champion: models:/ci-demo/" in first.stdout

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.`rlvr.step` = 'main'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == STEPS
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        if child.info.run_name == "evaluate":
            assert any(k.startswith("eval/") and k.endswith("/accuracy") for k in child.data.metrics)
    for label in ("warmstart", "baseline", "reasoning"):
        assert f"{label}/accuracy" in parent.data.metrics
    # a copy starts exactly as likely as its twin, so the reasoning arm's thoughts use reasoning ids; the baseline has none
    assert parent.data.metrics["reasoning/reasoning_share"] > 0.1 and parent.data.metrics["baseline/reasoning_share"] == 0

    champion = client.get_model_version_by_alias("ci-demo", "champion")
    arms = {c.info.run_id for c in children if c.info.run_name.startswith("train_")}
    assert champion.run_id in arms
    assert parent.data.tags["rlvr.champion"] == f"models:/ci-demo/{champion.version}"

    second = mlflow_run(tmp_path, experiment)
    assert second.returncode == 0, second.stderr[-5000:]
    rerun = next(r for r in client.search_runs([experiment_id], "tags.`rlvr.step` = 'main'")
                 if r.info.run_id != parent.info.run_id)
    assert client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{rerun.info.run_id}'") == []
    reused = client.search_runs([experiment_id], f"tags.`rlvr.reused_by.{rerun.info.run_id}` = 'true'")
    assert len(reused) == len(STEPS)
