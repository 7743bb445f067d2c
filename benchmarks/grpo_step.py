"""Time and memory of one GRPO optimizer step: plain TRL vs train_baseline vs train_reasoning.

    python benchmarks/grpo_step.py --variant plain
    python benchmarks/grpo_step.py --variant baseline --fast-rollouts true --profile
    python benchmarks/grpo_step.py --variant reasoning --fast-rollouts true
    python benchmarks/grpo_step.py --variant baseline --fast-rollouts true --prompts 64   # 512 per rollout
    python benchmarks/grpo_step.py --variant reasoning --completion-length 4096 --gradient-checkpointing \
        --steps 1 --warmup 0

Variants: `plain` is TRL's GRPOTrainer on the bare preset model (no rlvr code); `baseline` and `reasoning`
are the trainer `train_baseline`/`train_reasoning` build (N = 0 and N = 151646), with fast rollouts on or off.
Default workload (the reference configuration): `qwen3-0.6b-shape` with random weights, 8 prompts x 8
generations, 512 completion tokens, micro-batch 8, gradient accumulation 8, bf16 autocast over fp32 weights,
no gradient checkpointing. Random weights never emit EOS, so every completion has full length.

The reward is a seeded random number per completion unless `--reward task`: it varies within every group, so
advantages, gradients and the optimizer step are real work (`grad_norm` is printed per step).

Larger generation batches: `--prompts P` samples P x `--generations` completions in one rollout, which then
serves several optimizer steps of `--micro-batch` x `--grad-accum` sequences (TRL's `steps_per_generation`).
`--warmup` and `--steps` count rollout cycles (one rollout and the optimizer steps it serves).

Per optimizer step: wall time (median over the measured cycles), split into phases (the rollout, the rest of
scoring, the no-grad log-prob pass, the micro-batches' forward and backward, the optimizer, other); completion
tokens/s over a whole cycle and within the rollout; peak GPU memory overall, in the rollout and in the rest;
where the run corrects for it (fast rollouts or bf16), TRL's sampler/trainer mismatch metrics
(`sampling/sampling_logp_difference/*`, `sampling/importance_sampling_ratio/*`). `--profile` adds one cycle
profiled on the GPU: kernel time against wall time and the top kernels (benchmarks/profiling.py). Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import tempfile
import time
import types

import profiling
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOTrainer

from rlvr import rewards
from rlvr.grpo import REASONING_VOCAB_SIZE, ReasoningGRPOTrainer, TrainSettings, grpo_config
from rlvr.models import load_model
from rlvr.presets import build_preset
from rlvr.synthetic import generate as synthetic_problems
from rlvr.vocab import ReasoningVocab


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib(reset: bool = True) -> float:
    """Peak GPU memory allocated since the last reset, in GiB (NaN on a CPU); starts a new window."""
    if not torch.cuda.is_available():
        return float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return peak


class StepMeter(TrainerCallback):
    """Wall time and peak memory per optimizer step, split into phases: the rollout (the timed `generate`),
    the rest of scoring (decoding, rewards, metrics), the no-grad log-prob pass over the generation batch,
    the micro-batches' forward, loss and backward, and the optimizer. With `profile_step` set, that step's
    rollout and the rest of it are each profiled on the GPU."""

    PHASES = ("rollout", "scoring", "logprobs_no_grad", "forward_backward", "optimizer")

    def __init__(self, profile_step: int | None = None):
        self.steps: list[dict] = []
        self.phases: dict[str, float] = {}
        self.peaks = {"rollout": 0.0, "other": 0.0}
        self.profile_step = profile_step
        self.profiles: dict[str, dict] = {}
        self.profiling = False
        self._training_window = contextlib.ExitStack()
        self._start = 0.0
        self._optimizer_start = 0.0

    @property
    def rollout(self) -> float:
        return self.phases.get("rollout", 0.0)

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        _peak_gib()
        self.phases = {}
        self.peaks = {"rollout": 0.0, "other": 0.0}
        self.profiling = state.global_step == self.profile_step
        self._start = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        _sync()
        self._optimizer_start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        _sync()
        self.add("optimizer", time.perf_counter() - self._optimizer_start)

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        seconds = time.perf_counter() - self._start
        self._training_window.close()
        self.profiling = False
        self.peaks["other"] = max(self.peaks["other"], _peak_gib())
        phases = {name: round(self.phases.get(name, 0.0), 4) for name in self.PHASES}
        phases["other"] = round(seconds - sum(phases.values()), 4)
        self.steps.append(
            {
                "seconds": seconds,
                "rollout": self.rollout,
                "phases": phases,
                "peak_gib": max(self.peaks.values()),
                "rollout_peak_gib": self.peaks["rollout"],
                "training_peak_gib": self.peaks["other"],
            }
        )

    def start_training_window(self) -> None:
        """Profile from now to the end of the step (the part after the rollout)."""
        self.profiles["training_half"] = self._training_window.enter_context(profiling.window())


def time_generate(model, meter: StepMeter) -> None:
    inner = model.generate

    def timed(self, *args, **kwargs):
        _sync()
        meter.peaks["other"] = max(meter.peaks["other"], _peak_gib())
        start = time.perf_counter()
        if meter.profiling:
            with profiling.window() as meter.profiles["rollout"]:
                out = inner(*args, **kwargs)
        else:
            out = inner(*args, **kwargs)
        _sync()
        meter.add("rollout", time.perf_counter() - start)
        meter.peaks["rollout"] = max(meter.peaks["rollout"], _peak_gib())
        if meter.profiling:
            meter.start_training_window()
        return out

    model.generate = types.MethodType(timed, model)


def time_phases(trainer, meter: StepMeter) -> None:
    """Time the trainer's scoring (less the rollout inside it), its log-prob passes (no-grad ones apart) and
    its micro-batch steps (less the scoring that the first one triggers)."""

    def timed(name, account):
        inner = getattr(trainer, name)

        def wrapper(*args, **kwargs):
            _sync()
            before = dict(meter.phases)
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            _sync()
            account(time.perf_counter() - start, before)
            return out

        setattr(trainer, name, wrapper)

    def nested(phase, *inside):
        def account(seconds, before):
            spent = sum(meter.phases.get(p, 0.0) - before.get(p, 0.0) for p in inside)
            meter.add(phase, seconds - spent)

        return account

    def logprobs(seconds, before):
        if not torch.is_grad_enabled():
            meter.add("logprobs_no_grad", seconds)

    timed("_get_per_token_logps_and_entropies", logprobs)
    timed("_generate_and_score_completions", nested("scoring", "rollout", "logprobs_no_grad"))
    timed(
        "training_step",
        nested("forward_backward", "rollout", "scoring", "logprobs_no_grad"),
    )


def random_reward():
    """A reward that varies within every group (seeded, uniform in [0, 1)), so the loss, backward and
    optimizer do the work a real run does; random weights would earn the task rewards 0 everywhere, and every
    gradient 0."""
    generator = random.Random(0)

    def random_reward(completions, **kwargs) -> list[float]:
        return [generator.random() for _ in completions]

    return random_reward


def sampling_mismatch(logs: list[dict]) -> dict[str, float]:
    """Means over the measured steps of TRL's sampler/trainer mismatch metrics, where the run logged them."""
    names = (
        "sampling/sampling_logp_difference/mean",
        "sampling/sampling_logp_difference/max",
        "sampling/importance_sampling_ratio/min",
        "sampling/importance_sampling_ratio/max",
    )
    return {
        name: round(statistics.mean(values), 6)
        for name in names
        if (values := [log[name] for log in logs if name in log])
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", choices=("plain", "baseline", "reasoning"), required=True)
    parser.add_argument("--fast-rollouts", choices=("true", "false"), default="false")
    parser.add_argument("--preset", default="qwen3-0.6b-shape")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rollout")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=8)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=3, help="rollout cycles measured")
    parser.add_argument("--warmup", type=int, default=1, help="rollout cycles run before measuring")
    parser.add_argument(
        "--reward",
        choices=("random", "task"),
        default="random",
        help="random: a seeded uniform reward per completion, so advantages and gradients are "
        "never all zero; task: the accuracy and format rewards (0 for random weights)",
    )
    parser.add_argument(
        "--steps-per-generation",
        type=int,
        default=0,
        help="micro-batches one rollout serves (TRL's steps_per_generation); 0: what --prompts x "
        "--generations / --micro-batch makes it",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile one more rollout cycle after the measured ones: GPU kernel time against wall time and "
        "the top kernels, for the rollout and for the rest of the step",
    )
    args = parser.parse_args()

    rollout_sequences = args.prompts * args.generations
    step_sequences = args.micro_batch * args.grad_accum
    steps_per_generation = args.steps_per_generation or rollout_sequences // args.micro_batch
    if rollout_sequences != steps_per_generation * args.micro_batch or rollout_sequences % step_sequences:
        parser.error(
            f"--prompts x --generations ({rollout_sequences}) must be --micro-batch x --steps-per-generation "
            f"and whole optimizer steps of --micro-batch x --grad-accum ({step_sequences} sequences)"
        )
    cycle = rollout_sequences // step_sequences  # optimizer steps one rollout serves
    cycles = args.warmup + args.steps + int(args.profile)
    total_steps = cycles * cycle
    problems = synthetic_problems(step_sequences // args.generations * total_steps, seed=0)
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": p.question}], "solution": p.solution} for p in problems]
    )
    settings = TrainSettings(
        model=args.preset,
        reasoning_vocab_size=REASONING_VOCAB_SIZE if args.variant == "reasoning" else 0,
        max_steps=total_steps,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum,
        num_generations=args.generations,
        max_completion_length=args.completion_length,
        gradient_checkpointing=str(args.gradient_checkpointing).lower(),
        bf16="auto",
        output_dir=tempfile.mkdtemp(prefix="grpo-step-"),
    )
    overrides = {"save_strategy": "no", "shuffle_dataset": False, "logging_steps": 1}
    if args.reward == "random":
        overrides["reward_weights"] = [1.0]
    overrides["steps_per_generation"] = steps_per_generation
    config = grpo_config(settings, overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meter = StepMeter(profile_step=(args.warmup + args.steps) * cycle if args.profile else None)
    if args.variant == "plain":
        model, tokenizer = build_preset(args.preset, device=device)
        vocab = ReasoningVocab.for_tokenizer(tokenizer, model.get_input_embeddings().weight.shape[0], 0)
        trainer_class, extra = GRPOTrainer, {}
    else:
        model, tokenizer = load_model(args.preset, settings.reasoning_vocab_size, device=device)
        vocab = None
        trainer_class, extra = ReasoningGRPOTrainer, {"fast_rollouts": args.fast_rollouts == "true"}
    reward_funcs = rewards.reward_functions(tokenizer, vocab) if args.reward == "task" else [random_reward()]
    trainer = trainer_class(
        model=model,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[meter],
        **extra,
    )
    time_generate(trainer.model, meter)
    time_phases(trainer, meter)
    trainer.train()

    # one rollout cycle: the optimizer steps that one rollout serves, the rollout included
    per_cycle = [meter.steps[i : i + cycle] for i in range(0, len(meter.steps), cycle)]
    measured = per_cycle[args.warmup : args.warmup + args.steps]
    cycle_seconds = statistics.median(sum(s["seconds"] for s in steps) for steps in measured)
    rollout_seconds = statistics.median(sum(s["rollout"] for s in steps) for steps in measured)
    phases = {
        name: round(statistics.median(sum(s["phases"][name] for s in steps) / cycle for steps in measured), 3)
        for name in (*StepMeter.PHASES, "other")
    }
    tokens = rollout_sequences * args.completion_length
    result = {
        "variant": args.variant,
        "fast_rollouts": args.fast_rollouts == "true" and args.variant != "plain",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "completion_length": args.completion_length,
        "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum,
        "sequences_per_rollout": rollout_sequences,
        "gradient_checkpointing": args.gradient_checkpointing,
        "step_seconds": round(cycle_seconds / cycle, 3),
        "rollout_seconds": round(rollout_seconds, 3),
        "phase_seconds_per_step": phases,
        "completion_tokens_per_second": round(tokens / cycle_seconds, 1),
        "rollout_tokens_per_second": round(tokens / rollout_seconds, 1),
        **{
            name: round(max(s[name] for steps in measured for s in steps), 2)
            if torch.cuda.is_available()
            else None
            for name in ("peak_gib", "rollout_peak_gib", "training_peak_gib")
        },
        "first_cycle_seconds": round(sum(s["seconds"] for s in per_cycle[0]), 2),
        "all_steps": [round(s["seconds"], 2) for s in meter.steps],
        "reward": args.reward,
        "grad_norm": [round(log["grad_norm"], 4) for log in trainer.state.log_history if "grad_norm" in log],
        **sampling_mismatch(trainer.state.log_history[args.warmup * cycle :]),
    }
    if args.profile:
        result["profile"] = meter.profiles
    print(json.dumps(result))


if __name__ == "__main__":
    main()
