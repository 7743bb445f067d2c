"""Time and memory of one GRPO optimizer step: plain TRL vs train_baseline vs train_reasoning.

    python benchmarks/grpo_step.py --variant plain python benchmarks/grpo_step.py --variant baseline
    --fast-rollouts false python benchmarks/grpo_step.py --variant reasoning --fast-rollouts true python
    benchmarks/grpo_step.py --variant reasoning --completion-length 4096 --gradient-checkpointing --steps 1
    --warmup 0

Variants: `plain` is TRL's GRPOTrainer on the bare preset model (no rlvr code); `baseline` and `reasoning`
are the trainer `train_baseline`/`train_reasoning` build (N = 0 and N = 151646), with fast rollouts on or off.
Default workload (the reference configuration): `qwen3-0.6b-shape` with random weights, 8 prompts x 8
generations, 512 completion tokens, micro-batch 8, gradient accumulation 8, bf16 autocast over fp32 weights,
no gradient checkpointing. Random weights never emit EOS, so every completion has full length.

The reward is a seeded random number per completion unless `--reward task`: it varies within every group, so
advantages, gradients and the optimizer step are real work (`grad_norm` is printed per step).
`--steps-per-generation K` lets one rollout serve K micro-batches (TRL's `steps_per_generation`), the way to
larger generation batches; completion tokens/s then counts the step's share of the rollout.

Per step: wall time (median over `--steps` after `--warmup`), rollout time (the `generate` call), completion
tokens/s and peak GPU memory, overall and split into the rollout and the rest (log-probs, loss, optimizer);
where the run corrects for it (fast rollouts or bf16), TRL's sampler/trainer mismatch metrics
(`sampling/sampling_logp_difference/*`, `sampling/importance_sampling_ratio/*`). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import types

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
    """Wall time and peak memory per optimizer step, the rollout's share of both from the timed `generate`."""

    def __init__(self):
        self.steps: list[dict] = []
        self.rollout = 0.0
        self.peaks = {"rollout": 0.0, "other": 0.0}
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        _peak_gib()
        self.rollout = 0.0
        self.peaks = {"rollout": 0.0, "other": 0.0}
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        self.peaks["other"] = max(self.peaks["other"], _peak_gib())
        self.steps.append(
            {
                "seconds": time.perf_counter() - self._start,
                "rollout": self.rollout,
                "peak_gib": max(self.peaks.values()),
                "rollout_peak_gib": self.peaks["rollout"],
                "training_peak_gib": self.peaks["other"],
            }
        )


def time_generate(model, meter: StepMeter) -> None:
    inner = model.generate

    def timed(self, *args, **kwargs):
        _sync()
        meter.peaks["other"] = max(meter.peaks["other"], _peak_gib())
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        _sync()
        meter.rollout += time.perf_counter() - start
        meter.peaks["rollout"] = max(meter.peaks["rollout"], _peak_gib())
        return out

    model.generate = types.MethodType(timed, model)


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
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=8)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
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
        help="micro-batches one rollout serves (TRL's steps_per_generation); 0: TRL's default, "
        "the gradient accumulation steps",
    )
    args = parser.parse_args()

    total_steps = args.warmup + args.steps
    problems = synthetic_problems(args.prompts * total_steps, seed=0)
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
    if args.steps_per_generation:
        overrides["steps_per_generation"] = args.steps_per_generation
    config = grpo_config(settings, overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meter = StepMeter()
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
    trainer.train()

    measured = meter.steps[args.warmup :]
    seconds = statistics.median(s["seconds"] for s in measured)
    tokens = args.prompts * args.generations * args.completion_length
    result = {
        "variant": args.variant,
        "fast_rollouts": args.fast_rollouts == "true" and args.variant != "plain",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "completion_length": args.completion_length,
        "gradient_checkpointing": args.gradient_checkpointing,
        "step_seconds": round(seconds, 3),
        "rollout_seconds": round(statistics.median(s["rollout"] for s in measured), 3),
        "completion_tokens_per_second": round(tokens / seconds, 1),
        "peak_gib": round(max(s["peak_gib"] for s in measured), 2),
        "rollout_peak_gib": round(max(s["rollout_peak_gib"] for s in measured), 2),
        "training_peak_gib": round(max(s["training_peak_gib"] for s in measured), 2),
        "all_steps": [round(s["seconds"], 2) for s in meter.steps],
        "reward": args.reward,
        "sequences_per_rollout": args.micro_batch * (args.steps_per_generation or args.grad_accum),
        "grad_norm": [round(log["grad_norm"], 4) for log in trainer.state.log_history if "grad_norm" in log],
        **sampling_mismatch(trainer.state.log_history[args.warmup :]),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
