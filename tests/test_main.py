"""The `main` pipeline at CI scale through `mlflow run`, against a real tracking server."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT
from mlflow.tracking import MlflowClient

from rlvr import tracking
from rlvr.pipeline import EXPERIMENT

SEEDS = (0, 1)
PER_SEED = ["evaluate warmstart", "evaluate train_baseline", "evaluate train_reasoning", "train_baseline",
            "train_reasoning", "warmstart"]
STEPS = sorted(["preprocess"] + [f"{step} seed {seed}" for step in PER_SEED for seed in SEEDS])


def mlflow_run(tmp_path, **environment: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mlflow", "run", ".", "--env-manager", "local",
               "-P", "scale=ci", "-P", f"output_dir={tmp_path / 'main'}", "-P", "registered_model_name=ci-demo",
               "-P", f"seeds={','.join(map(str, SEEDS))}"]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, **environment}, capture_output=True,
                          text=True, timeout=1500, check=False)


def test_main_runs_every_step_as_a_child_sets_the_champion_and_reuses_finished_steps(tracking_uri, tmp_path,
                                                                                     monkeypatch):
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    first = mlflow_run(tmp_path)  # no experiment named: main runs in its own
    assert first.returncode == 0, first.stderr[-5000:]
    assert "| model | accuracy" in first.stdout and "champion: models:/ci-demo/" in first.stdout

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.`rlvr.step` = 'main'")
    assert parent.info.status == "FINISHED" and parent.info.run_name == "main"
    # the run `mlflow run` made in Default before main started stays there, finished, pointing to main
    (pointer,) = client.search_runs([tracking.DEFAULT_EXPERIMENT_ID],
                                    f"tags.`{tracking.MOVED_TO}` = '{parent.info.run_id}'")
    assert pointer.info.status == "FINISHED" and pointer.info.run_name == f"main (in experiment {EXPERIMENT})"
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == STEPS
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        if child.info.run_name.startswith("evaluate"):
            assert any(k.startswith("eval/") and k.endswith("/accuracy") for k in child.data.metrics)
    metrics = parent.data.metrics
    for label in ("warmstart", "baseline", "reasoning"):
        assert 0 <= metrics[f"{label}/accuracy_ci_low"] <= metrics[f"{label}/accuracy"] <= metrics[f"{label}/accuracy_ci_high"]
        by_seed = [metrics[f"{label}/seed_{seed}/accuracy"] for seed in SEEDS]  # same problems for every seed
        assert metrics[f"{label}/accuracy"] == pytest.approx(sum(by_seed) / len(SEEDS))
    for prefix in ("baseline/gain", "reasoning/gain", "reasoning_vs_baseline/diff"):
        assert metrics[f"{prefix}_ci_low"] <= metrics[prefix] <= metrics[f"{prefix}_ci_high"]
        assert 0 < metrics[f"{prefix}_p_value"] <= 1
        per_seed = [metrics[prefix.replace("/", f"/seed_{seed}/")] for seed in SEEDS]  # each seed's own paired test
        assert metrics[prefix] == pytest.approx(sum(per_seed) / len(SEEDS))
        assert all(f"| {prefix}, seed {seed}: " in first.stdout for seed in SEEDS)
    assert metrics["reasoning_vs_baseline/diff"] == pytest.approx(metrics["reasoning/accuracy"] - metrics["baseline/accuracy"])
    assert "paired comparison (B - A)" in first.stdout and "| 1 |" in first.stdout  # the per-seed table
    # a copy starts exactly as likely as its twin, so the reasoning arm's thoughts use reasoning ids; the baseline has none
    assert parent.data.metrics["reasoning/reasoning_share"] > 0.1 and parent.data.metrics["baseline/reasoning_share"] == 0

    champion = client.get_model_version_by_alias("ci-demo", "champion")
    arms = {c.info.run_id for c in children if c.info.run_name.startswith("train_")}
    assert champion.run_id in arms
    assert parent.data.tags["rlvr.champion"] == f"models:/ci-demo/{champion.version}"

    second = mlflow_run(tmp_path, MLFLOW_EXPERIMENT_NAME=EXPERIMENT)  # named by the user: no pointer
    assert second.returncode == 0, second.stderr[-5000:]
    rerun = next(r for r in client.search_runs([experiment_id], "tags.`rlvr.step` = 'main'")
                 if r.info.run_id != parent.info.run_id)
    pointers = f"tags.`{tracking.MOVED_TO}` = '{rerun.info.run_id}'"
    assert client.search_runs([tracking.DEFAULT_EXPERIMENT_ID], pointers) == []
    assert client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{rerun.info.run_id}'") == []
    reused = client.search_runs([experiment_id], f"tags.`rlvr.reused_by.{rerun.info.run_id}` = 'true'")
    assert len(reused) == len(STEPS)
