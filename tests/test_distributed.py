"""Several processes: two CPU processes over gloo train like one, the shipped accelerate configs, and how fast
rollouts read sharded weights."""

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import psutil
import pytest
import torch
import yaml
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedType,
    FullyShardedDataParallelPlugin,
    prepare_deepspeed_cmd_env,
    prepare_multi_gpu_env,
)
from conftest import ROOT, kill_when
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from rlvr import load_model, thoughts
from rlvr.errors import InputError
from rlvr.generation import stop_token_ids
from rlvr.grpo import TrainSettings, train
from rlvr.preprocess import Options, preprocess
from rlvr.rollout import FastRollout, rollout_weights
from rlvr.settings import bf16_enabled
from rlvr.surgery import enable_fast_rollouts
from rlvr.vocab import ReasoningVocab

METRICS = (
    "reasoning/token_share",
    "reasoning/thought_length",
    "reasoning/answer_length",
    "reasoning/closed_thought_rate",
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tables(run_id: str, tmp_path, name: str) -> dict[int, pd.DataFrame]:
    """The run's samples tables by the step that generated them."""
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="completions", dst_path=str(tmp_path / name)
    )
    tables = {}
    for path in sorted(Path(local).iterdir()):
        table = json.loads(path.read_text())
        frame = pd.DataFrame(table["data"], columns=table["columns"])
        tables[int(frame["step"].iloc[0])] = frame
    return tables


def _reasoning_metrics(vocab: ReasoningVocab, rows: pd.DataFrame, stops: list[int]) -> dict[str, float]:
    """The `reasoning/*` metrics of a set of completions (micro's template opens no thought), counted up to
    each one's stop token."""
    totals = torch.zeros(5)
    for ids in rows["completion_ids"]:
        ids = torch.tensor([ids])
        before = thoughts.completion_states(vocab, torch.tensor([False]), ids)
        totals += thoughts.batch_counts(vocab, before, ids, torch.ones_like(ids), stops)
    counted = thoughts.Counts(*totals.tolist())
    values = (counted.reasoning_share, counted.thought_length, counted.answer_length, counted.closed_rate)
    return dict(zip(METRICS, values, strict=True))


def test_two_cpu_processes_train_as_one_run_and_resume_after_a_kill(tracking_uri, tmp_path, monkeypatch):
    """`accelerate launch --config_file configs/ddp.yaml --num_processes 2` on a CPU: torchrun starts two
    processes that join over gloo. Killed after its first checkpoint and launched again, the training ends in
    one MLflow run, which rank 0 alone logged and registered, with every step once.

    Compared with one process that draws the same global batch with the same seed: the starting model and the
    prompts of every step are the same; the completions are not, since each process samples from its own
    random stream, sized by its own batch, so rewards and later weights agree only statistically and are not
    compared.
    """
    data = tmp_path / "data"
    preprocess("synthetic:count=120", data, Options(test_size=20, instruction=""))
    output = tmp_path / "two"
    experiment = "two-processes"
    common = [
        "--model",
        "micro",
        "--data",
        str(data),
        "--reasoning_vocab_size",
        "325",
        "--max_steps",
        "3",
        "--save_steps",
        "1",
        "--gradient_accumulation_steps",
        "2",
        "--num_generations",
        "4",
        "--max_completion_length",
        "16",
        "--log_completions_steps",
        "1",
    ]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "configs/ddp.yaml",
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "entrypoints.train_reasoning",
        *common,
        "--per_device_train_batch_size",
        "4",
        "--output_dir",
        str(output),
        "--registered_model_name",
        "two-processes",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env["MLFLOW_EXPERIMENT_NAME"] = experiment
    first_checkpoint = output / "checkpoint-1"
    workers = kill_when(  # the launcher's group; torchrun starts each process in a session of its own
        command,
        lambda: all((first_checkpoint / name).exists() for name in ("trainer_state.json", "rng_state_1.pth")),
        timeout=600,
        what="its first checkpoint",
        env=env,
    )
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, "processes outlived their launcher"
    assert not (output / "final").exists()
    run_id = json.loads((output / "mlflow_run.json").read_text())["run_id"]
    # killed: nobody finished it; RUNNING, or FAILED when rank 0 saw its peer's collective break first
    assert MlflowClient().get_run(run_id).info.status in ("RUNNING", "FAILED")

    rerun = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert rerun.returncode == 0, rerun.stderr[-5000:]

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    for name in run.data.metrics:  # rank 0 alone logs, and the resumed steps are not logged twice
        steps = [m.step for m in client.get_metric_history(run_id, name)]
        assert len(steps) == len(set(steps)), name
    for name in ("reward", "loss", "learning_rate", *METRICS):
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == [1, 2, 3], name
    (version,) = client.search_model_versions("name='two-processes'")
    assert version.run_id == run_id
    assert json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3

    model, tokenizer = load_model(str(output / "checkpoint-0"))
    vocab, stops = model.reasoning_vocab, stop_token_ids(model, tokenizer)
    tables = _tables(run_id, tmp_path, "two")
    assert sorted(tables) == [0, 1, 2]  # step 0 from the killed launch, the others after the resume
    sampled = differs = 0
    for step, table in tables.items():
        assert table["rank"].value_counts().to_dict() == {0: 8, 1: 8}, step  # both processes' completions
        for ids in table["completion_ids"]:
            ids = torch.tensor([ids])
            inside = thoughts.completion_states(vocab, torch.tensor([False]), ids)
            assert not (vocab.is_reasoning(ids) & ~inside).any(), f"reasoning id outside a thought ({step})"
            sampled += ids.numel()
        if step == 1:  # sampled around the kill: its table and its metrics may come from different launches
            continue
        # the logged metrics are the whole batch's, not rank 0's alone
        logged = {
            name: next(m.value for m in client.get_metric_history(run_id, name) if m.step == step + 1)
            for name in METRICS
        }
        assert logged == pytest.approx(_reasoning_metrics(vocab, table, stops), abs=1e-6), step
        rank0 = _reasoning_metrics(vocab, table[table["rank"] == 0], stops)
        differs += sum(abs(rank0[name] - logged[name]) > 1e-6 for name in METRICS)
    assert sampled > 200  # unconstrained, about half of these would be reasoning ids, most outside thoughts
    assert differs  # rank 0's completions alone would have logged other values

    # one process drawing the same global batch (8 per process instead of 4) with the same seed
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "one-process")
    single = tmp_path / "one"
    settings = {arg.lstrip("-"): value for arg, value in zip(common[::2], common[1::2], strict=True)}
    train(
        TrainSettings(
            **{k: type(getattr(TrainSettings, k))(v) for k, v in settings.items()},
            per_device_train_batch_size=8,
            output_dir=str(single),
            registered_model_name="",
        )
    )
    one = json.loads((single / "mlflow_run.json").read_text())["run_id"]
    start, single_start = (load_file(d / "checkpoint-0" / "model.safetensors") for d in (output, single))
    assert start.keys() == single_start.keys()
    assert all(torch.equal(start[k], single_start[k]) for k in start)
    reference = _tables(one, tmp_path, "one")
    for step, table in tables.items():
        assert sorted(table["prompt"]) == sorted(reference[step]["prompt"]), step


def _accelerator(kind, zero_stage=None, fsdp2=False):
    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage else None
    return SimpleNamespace(
        distributed_type=kind, deepspeed_plugin=plugin, is_fsdp2=fsdp2, is_main_process=True
    )


@pytest.mark.parametrize(
    "accelerator, gather, sharded, warned",
    [
        (_accelerator(DistributedType.NO), True, False, None),
        (_accelerator(DistributedType.MULTI_GPU), True, False, None),
        (_accelerator(DistributedType.MULTI_CPU), False, False, None),
        (_accelerator(DistributedType.DEEPSPEED, zero_stage=2), False, False, None),
        (_accelerator(DistributedType.DEEPSPEED, zero_stage=3), True, True, None),
        (
            _accelerator(DistributedType.DEEPSPEED, zero_stage=3),
            False,
            True,
            "ds3_gather_for_generation=false",
        ),
        (_accelerator(DistributedType.FSDP, fsdp2=True), True, True, None),
        (_accelerator(DistributedType.FSDP, fsdp2=False), True, True, "FSDP1"),
    ],
)
def test_fast_rollouts_read_whole_weights_or_turn_off_with_one_warning(
    accelerator, gather, sharded, warned, caplog
):
    with caplog.at_level(logging.WARNING, logger="rlvr.rollout"):
        weights = rollout_weights(accelerator, ds3_gather_for_generation=gather)
    assert weights.sharded is sharded
    if warned is None:
        assert weights.obstacle is None and not caplog.records
    else:
        assert warned in weights.obstacle
        (record,) = caplog.records
        assert "fast rollouts are off" in record.getMessage() and warned in record.getMessage()
    accelerator.is_main_process = False  # the other processes stay quiet
    caplog.clear()
    rollout_weights(accelerator, ds3_gather_for_generation=gather)
    assert not caplog.records


def test_fast_rollouts_gather_fsdp2_shards_into_their_own_copy():
    """Under FSDP2 every parameter is a DTensor holding this process's slice; the rollout copy gathers them
    whole and samples what the unsharded model samples (one process here: the gather is what is exercised)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from rlvr.generation import as_messages

    model, tokenizer = load_model("micro", reasoning_vocab_size=64)
    plain, _ = load_model("micro", reasoning_vocab_size=64)
    plain.load_state_dict(model.state_dict())
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template(
            as_messages(f"What is {i}+{i}?"), tokenize=False, add_generation_prompt=True
        )
        for i in range(4)
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    config = plain.generation_config
    config.update(do_sample=True, temperature=1.0, max_new_tokens=24, top_k=0)
    expected = FastRollout(plain, compile=False)
    torch.manual_seed(3)
    want, want_logprobs = expected.generate(batch["input_ids"], batch["attention_mask"], config)

    enable_fast_rollouts(model, compile=False, own_copy=True)  # as the trainer does: before the sharding
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        torch.manual_seed(3)
        got, got_logprobs = model.fast_rollout.generate(batch["input_ids"], batch["attention_mask"], config)
    finally:
        torch.distributed.destroy_process_group()
    assert torch.equal(got, want) and torch.allclose(got_logprobs, want_logprobs)


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "zero3"])
def test_the_shipped_accelerate_configs_set_up_what_their_comments_say(name, monkeypatch):
    """Each file read as `accelerate launch --config_file` reads it (the launcher's own validation and the
    environment it hands the processes), then the plugin the training processes build from it."""
    from accelerate.commands.launch import _validate_launch_command

    path = ROOT / "configs" / f"{name}.yaml"
    config = yaml.safe_load(path.read_text())
    assert config["mixed_precision"] == "no"  # the bf16 parameter decides (bf16_enabled)
    parser = launch_command_parser()
    options = vars(parser.parse_args(["train.py"]))
    nested = [key if key.startswith("fsdp") else f"fsdp_{key}" for key in config.get("fsdp_config", {})]
    nested += list(config.get("deepspeed_config", {}))
    assert [key for key in nested if key not in options] == []  # no misspelt option passes unnoticed
    args, _, _ = _validate_launch_command(parser.parse_args(["--config_file", str(path), "train.py"]))
    if name == "ddp":
        assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
        return
    if name == "fsdp2":
        environment = prepare_multi_gpu_env(args)
    else:
        # as launch_command does before it starts DeepSpeed's launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(config["deepspeed_config"])
        _, environment = prepare_deepspeed_cmd_env(args)
    for key, value in environment.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    if name == "fsdp2":
        fsdp = FullyShardedDataParallelPlugin()
        assert fsdp.fsdp_version == 2 and fsdp.reshard_after_forward
        assert fsdp.state_dict_type.name == "FULL_STATE_DICT"  # checkpoints stay Hugging Face directories
        assert not fsdp.cpu_ram_efficient_loading and not fsdp.activation_checkpointing
    else:
        zero = DeepSpeedPlugin()
        assert zero.zero_stage == 3 and not zero.zero3_init_flag
        assert zero.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]


@pytest.mark.parametrize(
    "launcher, bf16, allowed",
    [("no", "false", True), ("bf16", "true", True), ("bf16", "false", False), ("fp16", "true", False)],
)
def test_a_launcher_precision_other_than_the_bf16_parameter_is_refused(launcher, bf16, allowed, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    if allowed:
        assert bf16_enabled(bf16) is (bf16 == "true")
    else:
        with pytest.raises(InputError, match=f"asks for mixed_precision={launcher}"):
            bf16_enabled(bf16)


def test_two_cpu_processes_evaluate_as_one(tracking_uri, tmp_path, monkeypatch):
    """`accelerate launch --num_processes 2` of `evaluate`: each process samples half of the problems, the
    main one gathers them into one run, whose metrics and completions equal one process's (each sample's
    noise is keyed by its problem and index, not by the process or batch that draws it)."""
    common = ["--model", "micro", "--data", "synthetic:count=9", "--num_samples", "3",
              "--max_new_tokens", "24", "--temperature", "1.0", "--top_p", "0.9", "--batch_size", "4",
              "--instruction", ""]  # fmt: skip
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/ddp.yaml",
               "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "entrypoints.evaluate",
               *common]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env["MLFLOW_EXPERIMENT_NAME"] = "evaluate-two-processes"
    launched = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert launched.returncode == 0, launched.stderr[-5000:]
    assert launched.stdout.count("micro on synthetic:count=9: avg@3") == 1  # the main process reports

    from rlvr.evaluation import EvalSettings, evaluate

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "evaluate-one-process")
    settings = {arg.lstrip("-"): value for arg, value in zip(common[::2], common[1::2], strict=True)}
    single = evaluate(EvalSettings(**{k: type(getattr(EvalSettings, k))(v) for k, v in settings.items()}))

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("evaluate-two-processes").experiment_id])
    assert run.info.status == "FINISHED"
    logged = {k: v for k, v in run.data.metrics.items() if k.startswith("eval/")}
    assert logged == {
        f"eval/synthetic/{k}": v for k, v in single.metrics["micro"]["synthetic:count=9"].items()
    }
    tables = []
    for run_id in (run.info.run_id, single.run_id):
        table = mlflow.artifacts.load_dict(f"runs:/{run_id}/samples.json")
        frame = pd.DataFrame(table["data"], columns=table["columns"])
        tables.append(frame.sort_values(["id", "sample"]).reset_index(drop=True))
    assert len(tables[0]) == 9 * 3
    pd.testing.assert_frame_equal(tables[0], tables[1])
