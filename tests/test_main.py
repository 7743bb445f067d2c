"""The `main` pipeline at CI scale through `mlflow run`, against a real tracking server: killed at every stage
(the whole process group, SIGKILL), rerun with the same command until it finishes, then rerun to reuse
everything. No experiment is named until the last rerun, so `main` runs in its own (`rlvr-demo`)."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, kill_when
from mlflow.tracking import MlflowClient

from rlvr.pipeline import EXPERIMENT
from rlvr.tracking.runs import DEFAULT_EXPERIMENT_ID, MOVED_TO

SEEDS = (0, 1)
PER_SEED = [
    "evaluate warmstart",
    "evaluate train_baseline",
    "evaluate train_reasoning",
    "train_baseline",
    "train_reasoning",
    "warmstart",
]
STEPS = sorted(["preprocess"] + [f"{step} seed {seed}" for step in PER_SEED for seed in SEEDS])
TRAININGS = [
    f"{step} seed {seed}" for step in ("warmstart", "train_baseline", "train_reasoning") for seed in SEEDS
]


def mlflow_run_command(tmp_path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        ".",
        "--env-manager",
        "local",
        "-P",
        "scale=ci",
        "-P",
        f"output_dir={tmp_path / 'main'}",
        "-P",
        "registered_model_name=ci-demo",
        "-P",
        f"seeds={','.join(map(str, SEEDS))}",
    ]


def mlflow_run(tmp_path, **environment: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        mlflow_run_command(tmp_path),
        cwd=ROOT,
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )


def running(client: MlflowClient, experiment: str, name_prefix: str):
    def reached() -> bool:
        found = client.get_experiment_by_name(experiment)
        return found is not None and any(
            r.info.run_name.startswith(name_prefix)
            for r in client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'")
        )

    return reached


def checkpoint(tmp_path, step: str, number: int):
    return lambda: any((tmp_path / "main" / step).glob(f"*/checkpoint-{number}/trainer_state.json"))


def test_main_runs_every_step_as_a_child_sets_the_champion_and_reuses_finished_steps(
    tracking_uri, tmp_path, monkeypatch
):
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    experiment = EXPERIMENT
    client = MlflowClient()
    stages = {
        "preprocess": running(client, experiment, "preprocess"),
        "warmstart": checkpoint(tmp_path, "warmstart", 10),
        "grpo": checkpoint(tmp_path, "train_baseline", 1),
        "evaluate": running(client, experiment, "evaluate"),
    }
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    for stage, reached in stages.items():  # each rerun reuses what finished and resumes the killed training
        kill_when(
            mlflow_run_command(tmp_path),
            reached,
            timeout=900,
            what=f"main's {stage} stage",
            env=env,
            log=tmp_path / f"killed-in-{stage}.log",
        )
    first = mlflow_run(tmp_path)
    assert first.returncode == 0, first.stderr[-5000:]
    assert "| model | accuracy" in first.stdout and "champion: models:/ci-demo/" in first.stdout

    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]  # the killed ones were closed
    mains = [r for r in runs if r.data.tags.get("rlvr.step") == "main"]
    assert sorted(r.info.status for r in mains) == ["FINISHED"] + ["KILLED"] * len(stages)
    (parent,) = [r for r in mains if r.info.status == "FINISHED"]
    assert parent.info.run_name == "main"
    # the runs `mlflow run` made in Default before main started stay there as pointers: the killed ones closed
    pointers = client.search_runs([DEFAULT_EXPERIMENT_ID], f"tags.`{MOVED_TO}` LIKE '%'")
    pointers = [r for r in pointers if r.data.tags[MOVED_TO] in {m.info.run_id for m in mains}]
    assert sorted(r.info.status for r in pointers) == ["FINISHED"] + ["KILLED"] * len(stages)
    assert all(r.info.run_name == f"main (in experiment {EXPERIMENT})" for r in pointers)
    (finished,) = [r for r in pointers if r.info.status == "FINISHED"]
    assert finished.data.tags[MOVED_TO] == parent.info.run_id
    by_id = {r.info.run_id: r for r in runs}
    own = [
        by_id[c.data.tags.get("rlvr.resumed_into", c.info.run_id)]
        for c in runs
        if c.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    ]
    reused = [r for r in runs if r.data.tags.get(f"rlvr.reused_by.{parent.info.run_id}") == "true"]
    children = (
        own + reused
    )  # every step main used: run by this invocation, resumed, or reused from a killed one
    assert sorted(c.info.run_name for c in children) == STEPS
    assert all(c.info.status == "FINISHED" for c in children)
    for training in (c for c in children if c.info.run_name in TRAININGS):  # one run each, every step once
        assert sum(r.info.run_name == training.info.run_name for r in runs) == 1
        for key in ("loss", "learning_rate"):
            steps = [m.step for m in client.get_metric_history(training.info.run_id, key)]
            assert steps and len(steps) == len(set(steps)), (training.info.run_name, key, steps)
    resumed = {
        by_id[r.data.tags["rlvr.resumed_into"]].info.run_name
        for r in runs
        if "rlvr.resumed_into" in r.data.tags
    }
    assert resumed == {
        "warmstart seed 0",
        "train_baseline seed 0",
    }  # the two trainings killed after a checkpoint
    for child in children:
        if child.info.run_name.startswith("evaluate"):
            assert any(k.startswith("eval/") and k.endswith("/accuracy") for k in child.data.metrics)
    metrics = parent.data.metrics
    for label in ("warmstart", "baseline", "reasoning"):
        assert (
            0
            <= metrics[f"{label}/accuracy_ci_low"]
            <= metrics[f"{label}/accuracy"]
            <= metrics[f"{label}/accuracy_ci_high"]
        )
        by_seed = [metrics[f"{label}/seed_{seed}/accuracy"] for seed in SEEDS]  # same problems for every seed
        assert metrics[f"{label}/accuracy"] == pytest.approx(sum(by_seed) / len(SEEDS))
    for prefix in ("baseline/gain", "reasoning/gain", "reasoning_vs_baseline/diff"):
        assert metrics[f"{prefix}_ci_low"] <= metrics[prefix] <= metrics[f"{prefix}_ci_high"]
        assert 0 < metrics[f"{prefix}_p_value"] <= 1
        per_seed = [
            metrics[prefix.replace("/", f"/seed_{seed}/")] for seed in SEEDS
        ]  # each seed's own paired test
        assert metrics[prefix] == pytest.approx(sum(per_seed) / len(SEEDS))
        assert all(f"| {prefix}, seed {seed}: " in first.stdout for seed in SEEDS)
    assert metrics["reasoning_vs_baseline/diff"] == pytest.approx(
        metrics["reasoning/accuracy"] - metrics["baseline/accuracy"]
    )
    assert "paired comparison (B - A)" in first.stdout and "| 1 |" in first.stdout  # the per-seed table
    # a copy starts exactly as likely as its twin, so the reasoning arm's thoughts use reasoning ids; the
    # baseline has none
    assert (
        parent.data.metrics["reasoning/reasoning_share"] > 0.1
        and parent.data.metrics["baseline/reasoning_share"] == 0
    )

    champion = client.get_model_version_by_alias("ci-demo", "champion")
    arms = {c.info.run_id for c in children if c.info.run_name.startswith("train_")}
    assert champion.run_id in arms
    assert parent.data.tags["rlvr.champion"] == f"models:/ci-demo/{champion.version}"

    second = mlflow_run(tmp_path, MLFLOW_EXPERIMENT_NAME=EXPERIMENT)  # named by the user: no pointer
    assert second.returncode == 0, second.stderr[-5000:]
    (rerun,) = [
        r
        for r in client.search_runs(
            [experiment_id], "tags.`rlvr.step` = 'main' and attributes.status = 'FINISHED'"
        )
        if r.info.run_id != parent.info.run_id
    ]
    assert client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{rerun.info.run_id}'") == []
    moved = f"tags.`{MOVED_TO}` = '{rerun.info.run_id}'"
    assert client.search_runs([DEFAULT_EXPERIMENT_ID], moved) == []
    reused = client.search_runs([experiment_id], f"tags.`rlvr.reused_by.{rerun.info.run_id}` = 'true'")
    assert len(reused) == len(STEPS)
