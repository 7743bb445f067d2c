"""GRPO that actually learns on a GPU (warm start, real reward, non-zero advantages) under bf16 with fast
rollouts stays finite: the setting in which the demo once diverged. Random weights cannot show it: every
reward is 0, every advantage 0, every gradient 0."""

import json

import pytest
import torch
from conftest import warm_start_micro
from mlflow.tracking import MlflowClient

from rlvr.grpo import TrainSettings, train
from rlvr.models import load_model
from rlvr.preprocess import Options, preprocess

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
STEPS = 150


@pytest.mark.parametrize("correction", ["true", "false"])
def test_bf16_grpo_with_fast_rollouts_from_a_warm_start_stays_finite(tmp_path, monkeypatch, correction):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    data = tmp_path / "data"
    preprocess("synthetic:count=3000,digits=1", data, Options(test_size=16, instruction=""))
    warm = warm_start_micro(data, tmp_path / "warm", max_steps=600, learning_rate=1.2e-3)
    output = tmp_path / "grpo"
    train(
        TrainSettings(
            model=str(warm),
            data=str(data),
            reasoning_vocab_size=0,
            max_steps=STEPS,
            learning_rate=1e-4,
            per_device_train_batch_size=16,
            gradient_accumulation_steps=4,
            num_generations=4,
            max_completion_length=48,
            format_weight=0.5,
            bf16="true",
            fast_rollouts="true",
            sampling_correction=correction,
            save_steps=10_000,
            log_completions_steps=0,
            output_dir=str(output),
            registered_model_name="",
        )
    )

    run_id = json.loads((output / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient()
    grad_norms = [m.value for m in client.get_metric_history(run_id, "grad_norm")]
    spreads = [m.value for m in client.get_metric_history(run_id, "reward_std")]
    assert len(grad_norms) == STEPS and all(torch.isfinite(torch.tensor(grad_norms)))
    assert sum(s > 0 for s in spreads) > STEPS // 2  # the rewards differed within groups: real gradients
    assert client.get_run(run_id).info.status == "FINISHED"
    model, _ = load_model(str(output / "final"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
