"""Training entry points end to end against a real MLflow server: runs, params, metrics, registry, resume,
errors."""

import json
import os
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import QWEN3_N, ROOT, kill_when, warm_start_micro
from mlflow.tracking import MlflowClient
from trl import GRPOTrainer

from rlvr import load_model, thoughts
from rlvr.dataset import load_split
from rlvr.errors import InputError
from rlvr.grpo import COMPILE_LAYERS_ENV, NO_GRAD_TOKENS, ReasoningGRPOTrainer, layers_compiled
from rlvr.preprocess import Options, preprocess

SMALL = [  # a GRPO step in seconds on CPU: 2 prompts x 4 completions of 12 tokens
    "--max_steps", "2", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
    "--num_generations", "4", "--max_completion_length", "12", "--save_steps", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    preprocess("synthetic:count=120", out, Options(test_size=20, instruction=""))
    return out


def run_module(module: str, *args: str, env_extra: dict | None = None, check: bool = True):
    env = {**os.environ, **(env_extra or {})}
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if check and result.returncode:
        raise AssertionError(
            f"{module} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def only_run(experiment: str, **tags) -> mlflow.entities.Run:
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=query)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def reasoning_outside_thoughts(model, sequences: torch.Tensor, prompt_length: int) -> int:
    vocab = model.reasoning_vocab
    before = thoughts.inside_after(vocab, sequences, prompt_length)[:, prompt_length - 1 : -1]
    completion = sequences[:, prompt_length:]
    return int((vocab.is_reasoning(completion) & ~before).sum())


def test_train_reasoning_logs_registers_and_serves(tracking_uri, data_dir, tmp_path):
    output = tmp_path / "reasoning"
    experiment = "train-reasoning"
    run_module(
        "entrypoints.train_reasoning",
        "--model",
        "tiny-qwen3",
        "--data",
        str(data_dir),
        "--output_dir",
        str(output),
        "--registered_model_name",
        "test-reasoning",
        "--log_completions_steps",
        "1",
        *SMALL,
        env_extra={"MLFLOW_EXPERIMENT_NAME": experiment},
    )
    run = only_run(experiment, **{"rlvr.arm": "reasoning"})
    client = MlflowClient()
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["reasoning_vocab_size"] == str(QWEN3_N) and params["model"] == "tiny-qwen3"
    assert params["learning_rate"] == "1e-06" and params["grpo.scale_rewards"] == "group"
    for metric in (
        "reward",
        "rewards/accuracy_reward/mean",
        "rewards/format_reward/mean",
        "entropy",
        "completions/mean_length",
        "reasoning/token_share",
        "reasoning/thought_length",
        "reasoning/answer_length",
        "reasoning/closed_thought_rate",
    ):
        history = client.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in history] == [1, 2], metric
    # lineage: the training split preprocess wrote, by digest
    split = load_split(str(data_dir), "train")
    inputs = run.inputs.dataset_inputs
    assert [(i.dataset.digest, i.tags[0].value) for i in inputs] == [(split.digest, "train")]
    # samples table with reasoning tokens marked, every step
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "completions")}
    assert tables == {"completions/step_000000.json", "completions/step_000001.json"}
    # every checkpoint, checkpoint-0 included, carries the token map
    for step in (0, 1, 2):
        assert (
            json.loads((output / f"checkpoint-{step}" / "reasoning_token_map.json").read_text())[
                "base_vocab_size"
            ]
            == 151936
        )
    version = client.get_model_version("test-reasoning", "1")
    assert version.run_id == run.info.run_id
    assert version.tags == {
        "base_model": "tiny-qwen3",
        "reasoning_vocab_size": str(QWEN3_N),
        "data_digest": split.digest,
        "arm": "reasoning",
    }

    served = mlflow.pyfunc.load_model("models:/test-reasoning/1")
    frame = served.predict(
        pd.DataFrame({"prompt": ["What is 2+3?", "What is 7*6?"]}), params={"max_new_tokens": 8}
    )
    assert list(frame.columns) == ["completion", "thought", "answer", "reasoning_tokens"] and len(frame) == 2
    assert served.predict(["What is 1+1?"], params={"max_new_tokens": 4}).shape == (1, 4)

    model, tokenizer = load_model("models:/test-reasoning/1")
    assert model.reasoning_vocab.size == QWEN3_N
    batch = tokenizer(
        [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True
            )
        ]
        * 16,
        return_tensors="pt",
    )
    torch.manual_seed(0)
    sequences = model.generate(**batch, max_new_tokens=24, do_sample=True, top_k=0)
    assert reasoning_outside_thoughts(model, sequences, batch["input_ids"].shape[1]) == 0


def test_mlflow_run_train_baseline_on_micro_uses_one_run(tracking_uri, data_dir, tmp_path):
    experiment = "train-baseline"
    params = [
        "-P",
        "model=micro",
        "-P",
        f"data={data_dir}",
        "-P",
        f"output_dir={tmp_path / 'baseline'}",
        "-P",
        "registered_model_name=test-baseline",
        "-P",
        "max_steps=2",
        "-P",
        "per_device_train_batch_size=4",
        "-P",
        "gradient_accumulation_steps=2",
        "-P",
        "num_generations=4",
        "-P",
        "max_completion_length=12",
        "-P",
        "learning_rate=1e-5",
    ]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            ".",
            "--env-manager",
            "local",
            "-e",
            "train_baseline",
            "--experiment-name",
            experiment,
            *params,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1  # the run `mlflow run` created is the one the job logged into
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "1e-5"  # as typed; the Trainer's own logging did not collide
    assert run.data.tags["rlvr.arm"] == "baseline" and run.data.params["reasoning_vocab_size"] == "0"
    assert "reward" in run.data.metrics and "reasoning/token_share" in run.data.metrics
    assert run.data.metrics["reasoning/token_share"] == 0.0
    assert client.get_model_version("test-baseline", "1").tags["reasoning_vocab_size"] == "0"


def test_resume_after_sigkill_continues_the_same_run(tracking_uri, data_dir, tmp_path):
    output = tmp_path / "resume"
    experiment = "train-resume"
    args = [
        "-m",
        "entrypoints.train_baseline",
        "--model",
        "micro",
        "--data",
        str(data_dir),
        "--output_dir",
        str(output),
        "--registered_model_name",
        "",
        "--max_steps",
        "4",
        "--save_steps",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--num_generations",
        "4",
        "--max_completion_length",
        "12",
    ]
    kill_when(
        [sys.executable, *args],
        (output / "checkpoint-2" / "trainer_state.json").exists,
        timeout=600,
        what="its second checkpoint",
        env={**os.environ, "MLFLOW_EXPERIMENT_NAME": experiment},
    )
    first = json.loads((output / "mlflow_run.json").read_text())["run_id"]
    assert MlflowClient().get_run(first).info.status == "RUNNING"  # killed: nobody closed it

    result = run_module(*args[1:], env_extra={"MLFLOW_EXPERIMENT_NAME": experiment})
    assert "Error" not in result.stdout
    run = only_run(experiment)
    assert run.info.run_id == first and run.info.status == "FINISHED"
    steps = sorted(m.step for m in MlflowClient().get_metric_history(first, "reward"))
    assert steps == [1, 2, 3, 4]  # each step once, though the steps after the checkpoint ran twice
    state = json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and (output / "final" / "reasoning_token_map.json").exists()


@pytest.mark.parametrize("rerun_with", ["the same command", "--run-id"])
def test_a_killed_mlflow_run_rerun_resumes_its_training_with_each_step_once(
    tracking_uri, data_dir, tmp_path, rerun_with
):
    """SIGKILL of the whole `mlflow run` process group after a checkpoint, then the same command again (or
    with MLflow's own `--run-id` of the killed run)."""
    output = tmp_path / "resume"
    experiment = f"mlflow-run-resume-{rerun_with.strip('-').replace(' ', '-')}"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        ".",
        "-e",
        "train_baseline",
        "--env-manager",
        "local",
        "--experiment-name",
        experiment,
    ]
    for key, value in {
        "model": "micro",
        "data": data_dir,
        "output_dir": output,
        "registered_model_name": "",
        "max_steps": 4,
        "save_steps": 1,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "num_generations": 4,
        "max_completion_length": 12,
    }.items():
        command += ["-P", f"{key}={value}"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    kill_when(
        command,
        (output / "checkpoint-2" / "trainer_state.json").exists,
        timeout=600,
        what="its second checkpoint",
        env=env,
    )

    first = json.loads((output / "mlflow_run.json").read_text())["run_id"]
    if rerun_with == "--run-id":
        command += ["--run-id", first]
    rerun = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (training,) = [r for r in runs if r.info.run_id == first]
    assert training.info.status == "FINISHED" and training.info.run_name == "train_baseline"
    if rerun_with == "--run-id":  # the killed run itself was continued: no second run
        assert len(runs) == 1
    else:
        (pointer,) = [r for r in runs if r.info.run_id != first]
        assert pointer.info.status == "FINISHED" and pointer.data.tags["rlvr.resumed_into"] == first
        assert first in pointer.info.run_name and not pointer.data.metrics
    for key in ("reward", "loss", "learning_rate"):
        assert sorted(m.step for m in client.get_metric_history(first, key)) == [1, 2, 3, 4], key


@pytest.mark.parametrize(
    "module, args, message",
    [
        ("train_reasoning", ["--reasoning_vocab_size", "-3"], "is negative"),
        ("train_reasoning", ["--reasoning_vocab_size", "151670"], "exceeds the 151669 standard token ids"),
        ("train_baseline", ["--num_generations", "3"], "does not divide the generation batch of 8"),
        ("train_baseline", ["--data", "/no/such/dir"], "/no/such/dir"),
        ("train_baseline", ["--model", "no-such-org/no-such-model"], "not a preset"),
        ("train_baseline", ["--grpo_args", "use_vllm=true"], "train unconstrained"),
        ("train_baseline", ["--grpo_args", "learning_rat=1"], "not a GRPOConfig field"),
        ("train_baseline", ["--grpo_args", "top_p=0.9"], "sampling option top_p=0.9 is refused"),
        ("train_baseline", ["--grpo_args", "repetition_penalty=1.1"], "repetition_penalty=1.1 is refused"),
        (
            "train_baseline",
            ["--grpo_args", 'generation_kwargs={"typical_p":0.5}'],
            "typical_p=0.5 is refused",
        ),
        (
            "train_baseline",
            ["--grpo_args", 'generation_kwargs={"temperature":0.5}'],
            "may not set temperature",
        ),
        (
            "train_baseline",
            ["--grpo_args", "generation_kwargs={typical_p: 0.5}"],
            "put mappings and lists in a grpo_config",
        ),
        ("train_baseline", ["--sampling_correction", "auto"], "sampling_correction must be true or false"),
    ],
)
def test_bad_input_fails_before_training_with_one_clear_line(
    tracking_uri, data_dir, tmp_path, module, args, message
):
    from importlib import import_module

    output = tmp_path / "out"
    base = [
        "--model",
        "tiny-qwen3",
        "--data",
        str(data_dir),
        "--output_dir",
        str(output),
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--num_generations",
        "4",
    ]
    command = import_module(f"entrypoints.{module}").main
    result = CliRunner().invoke(command, base + args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and message in result.output
    assert "Traceback" not in result.output
    assert not any(output.glob("checkpoint-*/model.safetensors"))  # nothing trained, nothing half-written
    for run in MlflowClient().search_runs([mlflow.get_experiment_by_name("Default").experiment_id]):
        assert run.info.status != "RUNNING"


def test_unreachable_tracking_server_is_refused_up_front(data_dir, tmp_path, monkeypatch):
    from entrypoints.train_baseline import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    result = CliRunner().invoke(
        main, ["--model", "tiny-qwen3", "--data", str(data_dir), "--output_dir", str(tmp_path / "out")]
    )
    assert result.exit_code == 1 and "tracking server http://127.0.0.1:9 is unreachable" in result.output
    assert not (tmp_path / "out").exists()


def test_max_prompt_length_counts_tokens_and_leaves_out_longer_prompts(qwen_tok):
    from rlvr.grpo import _prompt_dataset

    frame = pd.DataFrame({
        "prompt": [[{"role": "user", "content": "What is 2+2?"}],
                   [{"role": "user", "content": "2 + " * 1000 + "2?"}]],
        "solution": ["4", "2002"], "id": ["short", "long"],
    })  # fmt: skip
    short = len(
        qwen_tok(
            qwen_tok.apply_chat_template(list(frame["prompt"][0]), tokenize=False, add_generation_prompt=True)
        )["input_ids"]
    )
    dataset, too_long = _prompt_dataset(frame, qwen_tok, max_prompt_length=short)
    assert too_long == 1 and dataset["id"] == ["short"]
    assert _prompt_dataset(frame, qwen_tok, max_prompt_length=4000)[1] == 0


def test_fast_rollouts_log_the_sampling_mismatch_and_correct_it(tracking_uri, data_dir, tmp_path):
    """Fast rollouts keep each sampled token's log-prob; TRL's truncated importance sampling then corrects the
    loss, logging how far sampler and trainer disagree (in fp32 on a CPU: rounding only)."""
    client = MlflowClient()
    for correction in ("true", "false"):
        experiment = f"sampling-correction-{correction}"
        run_module(
            "entrypoints.train_baseline",
            "--model",
            "micro",
            "--data",
            str(data_dir),
            "--output_dir",
            str(tmp_path / correction),
            "--registered_model_name",
            "",
            "--fast_rollouts",
            "true",
            "--sampling_correction",
            correction,
            "--max_prompt_length",
            "40",
            *SMALL,
            env_extra={"MLFLOW_EXPERIMENT_NAME": experiment},
        )
        run = only_run(experiment, **{"rlvr.arm": "baseline"})
        metrics = run.data.metrics
        assert metrics["data/prompts_too_long"] == 0
        if correction == "false":
            assert not any(name.startswith("sampling/") for name in metrics)
            continue
        assert [
            m.step
            for m in client.get_metric_history(run.info.run_id, "sampling/sampling_logp_difference/mean")
        ] == [1, 2]
        assert 0 <= metrics["sampling/sampling_logp_difference/max"] < 1e-3
        for name in ("min", "mean", "max"):
            assert metrics[f"sampling/importance_sampling_ratio/{name}"] == pytest.approx(1.0, abs=1e-3)


def test_a_model_whose_generation_config_reshapes_sampling_is_refused(
    tracking_uri, data_dir, tmp_path, monkeypatch
):
    from entrypoints.train_baseline import main

    model, tokenizer = load_model("micro")
    model.generation_config.do_sample, model.generation_config.typical_p = (
        True,
        0.5,
    )  # as a hub model may ship
    source = tmp_path / "typical"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "refused-generation-config")
    output = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["--model", str(source), "--data", str(data_dir), "--output_dir", str(output), *SMALL]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "sampling would use typical_p=0.5" in result.output
    assert not (output / "checkpoint-1").exists()
    run = only_run("refused-generation-config", **{"rlvr.arm": "baseline"})
    assert run.info.status == "FAILED"


def test_the_same_seed_on_the_same_machine_logs_the_same_metrics(tracking_uri, tmp_path, monkeypatch):
    """Reproducibility: two trainings with one seed log identical metrics at every step, to the last bit, from
    a warm start that gets some completions' format right, so advantages and gradients are not zero."""
    data = tmp_path / "data"
    preprocess("synthetic:count=200,digits=1", data, Options(test_size=8, instruction=""))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "reproducible-warm")
    warm = warm_start_micro(data, tmp_path / "warm", max_steps=50, learning_rate=3e-3)
    client = MlflowClient()
    histories = []
    for attempt in ("first", "second"):
        experiment = f"reproducible-{attempt}"
        run_module(
            "entrypoints.train_reasoning",
            "--model",
            str(warm),
            "--data",
            str(data),
            "--output_dir",
            str(tmp_path / attempt),
            "--registered_model_name",
            "",
            "--reasoning_vocab_size",
            "64",
            "--seed",
            "3",
            "--learning_rate",
            "1e-3",
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "8",
            "--gradient_accumulation_steps",
            "2",
            "--num_generations",
            "4",
            "--max_completion_length",
            "24",
            "--format_weight",
            "1",
            "--save_steps",
            "10",
            env_extra={"MLFLOW_EXPERIMENT_NAME": experiment},
        )
        run = only_run(experiment, **{"rlvr.arm": "reasoning"})
        histories.append(
            {
                name: [
                    (m.step, m.value)
                    for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
                ]
                for name in run.data.metrics
                if not any(clock in name for clock in ("time", "per_second"))
            }
        )  # everything but wall-clock measurements
    assert histories[0] == histories[1]
    assert len(histories[0]["reward"]) == 3 and histories[0]["grad_norm"][0][1] > 0  # it trained


def test_log_prob_passes_without_gradients_score_more_sequences_at_once(monkeypatch):
    seen = []
    monkeypatch.setattr(
        GRPOTrainer,
        "_get_per_token_logps_and_entropies",
        lambda self, model, ids, mask, keep, batch_size=None, *a, **k: seen.append(batch_size),
    )
    trainer = object.__new__(ReasoningGRPOTrainer)  # only the override is under test
    ids = torch.zeros(64, 600, dtype=torch.long)
    with torch.no_grad():
        trainer._get_per_token_logps_and_entropies(None, ids, None, 500, batch_size=8)
    trainer._get_per_token_logps_and_entropies(None, ids, None, 500, batch_size=8)  # the training pass
    long_ids = torch.zeros(64, NO_GRAD_TOKENS, dtype=torch.long)
    with torch.no_grad():
        trainer._get_per_token_logps_and_entropies(None, long_ids, None, 500, batch_size=8)
    assert seen == [NO_GRAD_TOKENS // 600, 8, 8]


def test_decoder_layers_compile_by_default_only_where_measured(monkeypatch):
    monkeypatch.delenv(COMPILE_LAYERS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert layers_compiled(gradient_checkpointing=False, distributed=False)
    assert not layers_compiled(gradient_checkpointing=True, distributed=False)  # not measured: checkpointing,
    assert not layers_compiled(gradient_checkpointing=False, distributed=True)  # several processes, sharding
    monkeypatch.setenv(COMPILE_LAYERS_ENV, "0")
    assert not layers_compiled(gradient_checkpointing=False, distributed=False)
    monkeypatch.setenv(COMPILE_LAYERS_ENV, "1")
    assert layers_compiled(gradient_checkpointing=True, distributed=True)  # asked for: the user's call
    monkeypatch.setenv(COMPILE_LAYERS_ENV, "yes")
    with pytest.raises(InputError, match=f"{COMPILE_LAYERS_ENV}='yes'"):
        layers_compiled(gradient_checkpointing=False, distributed=False)
    monkeypatch.setenv(COMPILE_LAYERS_ENV, "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not layers_compiled(gradient_checkpointing=False, distributed=False)  # never off a GPU
