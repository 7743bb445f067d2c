"""No silent divergence: a non-finite step stops training in one line, keeps the last finite checkpoint,
registers nothing; a non-finite model is refused by evaluate."""

import json
import re

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from transformers import TrainerControl, TrainerState, TrainingArguments

from rlvr import load_model, save_model
from rlvr.guards import StopOnNonFinite, TrainingDiverged
from rlvr.preprocess import Options, preprocess
from rlvr.surgery import enable_fast_rollouts


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    preprocess("synthetic:count=64", out, Options(test_size=8, instruction=""))
    return out


def test_the_guard_stops_before_a_non_finite_gradient_is_applied(tmp_path):
    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.ones(2, 3)
    args, state = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerState(global_step=4)
    guard = StopOnNonFinite()
    assert isinstance(guard.on_pre_optimizer_step(args, state, TrainerControl(), model=model), TrainerControl)
    model.weight.grad[1, 2] = float("nan")
    with pytest.raises(TrainingDiverged, match="training diverged at step 5"):
        guard.on_pre_optimizer_step(args, state, TrainerControl(), model=model)


def run_of(output_dir) -> str:
    return json.loads((output_dir / "mlflow_run.json").read_text())["run_id"]


def test_a_diverging_warm_start_fails_in_one_line_keeps_its_finite_checkpoint_and_registers_nothing(
    tracking_uri, data_dir, tmp_path, monkeypatch
):
    from entrypoints.warmstart import main

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "diverging")
    output = tmp_path / "warm"
    # a learning rate of 1e30 sends the weights to ~1e30 in one Adam step; the next forward overflows
    result = CliRunner().invoke(
        main,
        [
            "--model",
            "micro",
            "--data",
            str(data_dir),
            "--output_dir",
            str(output),
            "--max_steps",
            "4",
            "--save_steps",
            "1",
            "--learning_rate",
            "1e30",
            "--per_device_train_batch_size",
            "4",
            "--registered_model_name",
            "diverged-model",
        ],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    diverged = re.search(r"Error: training diverged at step (\d+)", result.output)
    assert diverged, result.output[-2000:]
    step = int(diverged[1])
    client = MlflowClient()
    assert client.get_run(run_of(output)).info.status == "FAILED"
    assert client.search_model_versions("name='diverged-model'") == []
    assert not (output / "final").exists() and not (output / f"checkpoint-{step}").exists()
    model, _ = load_model(str(output / f"checkpoint-{step - 1}"))  # the last one written, before the bad step
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_grpo_step_that_turns_non_finite_is_stopped(tracking_uri, data_dir, tmp_path, monkeypatch):
    """Finite weights whose forward overflows (a final norm scaled to 3e38): the first loss is NaN."""
    from entrypoints.train_baseline import main

    model, tokenizer = load_model("micro")
    with torch.no_grad():
        model.model.norm.weight.fill_(3e38)
    source = save_model(model, tokenizer, tmp_path / "overflowing")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "diverging-grpo")
    output = tmp_path / "grpo"
    result = CliRunner().invoke(
        main,
        [
            "--model",
            str(source),
            "--data",
            str(data_dir),
            "--output_dir",
            str(output),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--gradient_accumulation_steps",
            "1",
            "--num_generations",
            "4",
            "--max_completion_length",
            "8",
            "--fast_rollouts",
            "true",
            "--registered_model_name",
            "diverged-grpo",
        ],
    )
    assert result.exit_code == 1 and "Error: training diverged at step 1" in result.output, result.output
    assert MlflowClient().get_run(run_of(output)).info.status == "FAILED"
    assert MlflowClient().search_model_versions("name='diverged-grpo'") == []


def test_evaluate_refuses_a_model_with_non_finite_weights(tracking_uri, data_dir, tmp_path):
    from entrypoints.evaluate import main

    model, tokenizer = load_model("micro")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    source = save_model(model, tokenizer, tmp_path / "nan-model")
    result = CliRunner().invoke(main, ["--model", str(source), "--data", str(data_dir), "--split", "test"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "has non-finite weights (model.layers.0.mlp.up_proj.weight)" in result.output


def test_fast_rollouts_never_draw_a_masked_id_even_from_zero_noise(monkeypatch):
    """Gumbel-max with an exponential draw of exactly 0 would give a masked id an infinite score."""
    model, tokenizer = load_model("tiny-qwen3", reasoning_vocab_size=8)
    enable_fast_rollouts(model, compile=False)
    masked = torch.tensor([151700, model.reasoning_vocab.total_size - 1])  # a padding row, a reasoning id
    monkeypatch.setattr(
        torch.Tensor, "exponential_", lambda self, *a, **k: self.fill_(1.0).index_fill_(-1, masked, 0.0)
    )
    batch = tokenizer(["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"] * 2, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=0, pad_token_id=151643)
    completion = out[:, batch["input_ids"].shape[1] :]
    assert not (
        completion >= model.reasoning_vocab.tokenizer_size
    ).any()  # no padding row, no reasoning id outside
