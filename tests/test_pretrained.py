"""The pretrained path of `main` as a smoke run on a CPU (`-P scale=pretrained-ci`): the real
SmolLM2-135M-Instruct and the real reasoning-gym generators, a few tokens, through `mlflow run` against a
real tracking server. The GPU scale (`pretrained`) is the same path at size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from mlflow.tracking import MlflowClient

from rlvr.cache import CACHE_ENV
from rlvr.pipeline import SCALES
from rlvr.vocab import TOKEN_MAP_FILE

EXPERIMENT = "pretrained-ci"
STEPS = ["evaluate start", "evaluate train_baseline", "evaluate train_reasoning", "preprocess",
         "train_baseline", "train_reasoning"]  # fmt: skip


def test_the_pretrained_scale_trains_and_evaluates_both_arms_from_the_instruct_model():
    assert (
        set(SCALES["pretrained"])
        == set(SCALES["pretrained-ci"])
        == {"preprocess", "start", "train", "evaluate"}
    )
    for step in ("preprocess", "start"):  # the smoke runs the same source (but fewer problems) and model
        assert SCALES["pretrained"][step].keys() == SCALES["pretrained-ci"][step].keys()
    assert (
        SCALES["pretrained"]["start"]
        == SCALES["pretrained-ci"]["start"]
        == {"model": "smollm2-135m-instruct"}
    )
    train, evaluate = SCALES["pretrained"]["train"], SCALES["pretrained"]["evaluate"]
    assert train["fast_rollouts"] == "true" and "lenient" in train["rewards"]
    assert SCALES["pretrained"]["preprocess"]["test_size"] >= 500 and evaluate["max_examples"] >= 500


@pytest.mark.slow
def test_main_runs_the_pretrained_path_on_the_real_model_and_generators(
    tracking_uri, smollm2_cache, tmp_path
):
    command = [sys.executable, "-m", "mlflow", "run", ".", "--env-manager", "local", "--experiment-name",
               EXPERIMENT, "-P", "scale=pretrained-ci", "-P", f"output_dir={tmp_path / 'main'}",
               "-P", "reasoning_vocab_size=32", "-P", "registered_model_name=pretrained-ci"]  # fmt: skip
    env = {**os.environ, CACHE_ENV: str(smollm2_cache), "MLFLOW_TRACKING_URI": tracking_uri}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False
    )
    assert done.returncode == 0, done.stderr[-5000:]
    # the table shows both readings of every model, and both kinds of paired comparison
    assert "| model | accuracy |" in done.stdout and "lenient_accuracy" in done.stdout
    for line in ("| baseline/gain: baseline - start |", "| reasoning/lenient_gain: reasoning - start |"):
        assert line in done.stdout

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("rlvr.step") == "main"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.info.run_name for c in children) == STEPS
    assert all(c.info.status == "FINISHED" for c in children)
    by_name = {c.info.run_name: c for c in children}
    assert by_name["preprocess"].data.tags["rlvr.reasoning_gym_version"]
    assert by_name["evaluate start"].data.tags["rlvr.model"] == "smollm2-135m-instruct"
    for name in ("evaluate start", "evaluate train_baseline", "evaluate train_reasoning"):
        metrics = by_name[name].data.metrics
        label = "reasoning_gym_basic_arithmetic_chain_sum"
        assert 0 <= metrics[f"eval/{label}/accuracy"] <= metrics[f"eval/{label}/lenient_accuracy"] <= 1
    metrics = parent.data.metrics
    for label in ("start", "baseline", "reasoning"):
        assert 0 <= metrics[f"{label}/lenient_accuracy_ci_low"] <= metrics[f"{label}/lenient_accuracy"]
    assert metrics["reasoning/lenient_gain_ci_low"] <= metrics["reasoning/lenient_gain"]

    # both arms start from the instruct model with the thought tags added, recorded in their token maps
    for arm, rows in (("train_baseline", 0), ("train_reasoning", 32)):
        output_dir = Path(by_name[arm].data.params["output_dir"])
        token_map = json.loads((output_dir / "checkpoint-0" / TOKEN_MAP_FILE).read_text())
        assert token_map["added_token_ids"] == [49152, 49153] and len(token_map["standard_token_ids"]) == rows
        assert (token_map["think_start_id"], token_map["think_end_id"], token_map["tokenizer_size"]) == (
            49152,
            49153,
            49154,
        )
        assert by_name[arm].data.params["model"] == "smollm2-135m-instruct"
