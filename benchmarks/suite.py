"""The GRPO-step benchmarks of the speed issue in one command with a deadline, one compact table as it goes.

    source benchmarks/gpu_env.sh && python benchmarks/suite.py --budget 530 --output $OUT/suite.jsonl
    python benchmarks/suite.py --only baseline,baseline-warm,reasoning-1024,reasoning-4096 --budget 530
    python benchmarks/suite.py --toy --budget 1500          # every part at toy size, e.g. on a CPU

On a fresh H200 the first command gets through `baseline` to `decode` in about 8 minutes (each first step
compiles from a cold cache) and skips the rest; the second measures the warm-cache first step and the long
completions.

Runs, in this order (`--only` picks some), each in a process of its own:
- `baseline`, `reasoning`: `grpo_step.py` for train_baseline / train_reasoning (N = 151646) with fast
  rollouts; the first compiles from a cold kernel cache, so its first step states the cold cost;
- `plain`: plain TRL `GRPOTrainer` on the same workload, for the 10x target;
- `head`: `logprob_head.py`, the fused log-prob head against the previous and the materialised one;
- `decode`: `rollout_decode.py`, ms per decode step at 64 and 256 sequences (fused projections), attending by
  cache blocks and densely over the whole ring;
- `baseline-warm`: train_baseline again, its first step now from the kernels the runs above left on disk;
- `baseline-eager-layers`: train_baseline with its decoder layers left uncompiled for training
  (`RLVR_COMPILE_LAYERS=0`; compiled is the default on a GPU);
- `baseline-micro32`: train_baseline with the same 64 completions per step in micro-batches of 32;
- `reasoning-1024`, `reasoning-4096`: train_reasoning with 1024 and (gradient checkpointing) 4096 completion
  tokens, one measured step each.
The reference workload (qwen3-0.6b-shape, 8 prompts x 8 generations x 512 tokens, micro-batch 8, accumulation
8, bf16, random reward) is `grpo_step.py`'s default. Before each part the remaining `--budget` is checked
against that part's expected seconds; a part that would not fit is skipped, one still running at the deadline
is stopped, so the command ends before it. Every JSON line the parts print also goes to `--output`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REFERENCE = ["--fast-rollouts", "true", "--steps", "2", "--warmup", "1"]
# the toy workload: tiny-qwen3, 2 prompts x 4 generations x 16 tokens, micro-batch 4, accumulation 2
TOY = "--preset tiny-qwen3 --prompts 2 --generations 4 --micro-batch 4 --grad-accum 2 --steps 1 --warmup 1"


@dataclass(frozen=True)
class Part:
    name: str
    script: str
    args: str
    toy_args: str
    seconds: float  # expected on a fresh H200 machine; the part is skipped when less budget is left
    env: tuple[tuple[str, str], ...] = ()


def _step(variant: str, extra: str = "", toy_extra: str = "--completion-length 16") -> tuple[str, str, str]:
    return (
        "grpo_step.py",
        f"--variant {variant} {extra}",
        f"--variant {variant} --fast-rollouts true {TOY} {toy_extra}",
    )


PARTS = [
    Part("baseline", *_step("baseline", " ".join(REFERENCE)), 90),
    Part("reasoning", *_step("reasoning", " ".join(REFERENCE)), 80),
    Part("plain", *_step("plain", "--steps 1 --warmup 1"), 90),
    Part("head", "logprob_head.py", "", "--preset tiny-qwen3 --tokens 512 --repeats 1", 45),
    Part(
        "decode",
        "rollout_decode.py",
        "--batch 64,256 --fused true --blocks both --repeats 1 --reserve 50",
        "--preset tiny-qwen3 --batch 4,8 --fused true --blocks both --new-tokens 8 --prompt-length 20 "
        "--repeats 1 --reserve 5",
        60,
    ),
    Part("baseline-warm", *_step("baseline", " ".join(REFERENCE)), 60),
    Part(
        "baseline-eager-layers",
        *_step("baseline", " ".join(REFERENCE)),
        90,
        env=(("RLVR_COMPILE_LAYERS", "0"),),
    ),
    Part(
        "baseline-micro32",
        *_step(
            "baseline",
            " ".join(REFERENCE) + " --micro-batch 32 --grad-accum 2",
            "--completion-length 16 --micro-batch 8 --grad-accum 1",
        ),
        90,
    ),
    Part(
        "reasoning-1024",
        *_step(
            "reasoning",
            "--fast-rollouts true --completion-length 1024 --steps 1 --warmup 1",
            "--completion-length 32",
        ),
        90,
    ),
    Part(
        "reasoning-4096",
        *_step(
            "reasoning",
            "--fast-rollouts true --completion-length 4096 --gradient-checkpointing --steps 1 --warmup 0",
            "--completion-length 64 --gradient-checkpointing",
        ),
        150,
    ),
]


def part_args(part: Part, toy: bool, remaining: float) -> list[str]:
    args = (part.toy_args if toy else part.args).split()
    if part.script == "rollout_decode.py":
        args += ["--budget", str(int(remaining))]
    return args


def row(name: str, result: dict) -> str | None:
    """One compact table row for a JSON line a part printed."""
    if "skipped" in result:
        return f"| {name} | skipped {result['skipped']} ({result['reason']}) |"
    if "variant" in result:
        phases = result["phase_seconds_per_step"]
        return (
            f"| {name} | {result['step_seconds']:.2f} s/step | rollout {phases['rollout']:.2f} | scoring "
            f"{phases['scoring']:.2f} | no-grad logp {phases['logprobs_no_grad']:.2f} | fwd+bwd "
            f"{phases['forward_backward']:.2f} | optim {phases['optimizer']:.3f} | peak "
            f"{result['peak_gib']} GiB (rollout {result['rollout_peak_gib']}, rest "
            f"{result['training_peak_gib']}) | first step "
            f"{result['first_cycle_seconds']} s | logp diff "
            f"{result.get('sampling/sampling_logp_difference/mean', '-')} | grad_norm {result['grad_norm']} |"
        )
    if "head" in result:
        return (
            f"| {name} {result['head']} | fwd+bwd {result['forward_backward_s']} s | no-grad "
            f"{result['no_grad_forward_s']} s | peak {result['peak_gib']} GiB | first "
            f"{result['first_pass_s']} s | {result['tokens']} tokens x {result['vocabulary_rows']} rows |"
        )
    if "fast_ms_per_step" in result:
        return (
            f"| {name} batch {result['batch']} {'fused' if result['fused'] else 'unfused'} "
            f"{'blocks' if result.get('blocks') else 'dense'} | "
            f"{result['fast_ms_per_step']} ms/step | {result['fast_tokens_per_s']} tok/s | first rollout "
            f"{result['first_rollout_s']} s | peak {result['fast_peak_gib']} GiB |"
        )
    return None


def run_part(part: Part, args: list[str], timeout: float, output, log: Path) -> str:
    """Run one part, printing a row per JSON line as it comes; returns how it ended."""
    command = [sys.executable, str(HERE / part.script), *args]
    print(f"# {part.name}: {' '.join(command[1:])}", flush=True)
    with open(log, "a") as stderr:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=HERE,
            start_new_session=True,
            env={**os.environ, **dict(part.env)},
        )
        deadline = time.monotonic() + timeout
        try:
            for line in _lines(process, deadline):
                try:
                    result = json.loads(line)
                except json.JSONDecodeError:  # the trainer's own log lines
                    continue
                if not isinstance(result, dict):
                    continue
                output.write(json.dumps({"part": part.name, **result}) + "\n")
                output.flush()
                if (text := row(part.name, result)) is not None:
                    print(text, flush=True)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if time.monotonic() >= deadline:
        return "stopped at the deadline"
    return "ok" if process.returncode == 0 else f"failed (exit {process.returncode}; see {log})"


def _lines(process: subprocess.Popen, deadline: float):
    """The process's stdout lines until it ends or the deadline passes."""
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    while (left := deadline - time.monotonic()) > 0:
        if not selector.select(timeout=min(left, 5)):
            if process.poll() is not None:
                break
            continue
        line = process.stdout.readline()
        if not line:
            break
        yield line


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", type=float, default=530, help="seconds the whole command may take")
    parser.add_argument(
        "--only", default="", help=f"comma-separated parts of: {', '.join(p.name for p in PARTS)}"
    )
    parser.add_argument(
        "--toy", action="store_true", help="tiny sizes, to check every part runs (e.g. on a CPU)"
    )
    parser.add_argument("--output", default="suite.jsonl", help="every JSON line, tagged with its part")
    args = parser.parse_args()
    chosen = [p for p in args.only.split(",") if p]
    if unknown := set(chosen) - {p.name for p in PARTS}:
        parser.error(f"unknown parts {sorted(unknown)}")
    parts = [p for p in PARTS if not chosen or p.name in chosen]
    deadline = time.monotonic() + args.budget
    log = Path(args.output).with_suffix(".log")
    with open(args.output, "a") as output:
        for part in parts:
            remaining = deadline - time.monotonic() - 5  # the margin to stop a part and exit
            if remaining < (part.seconds if not args.toy else 10):
                print(
                    f"| {part.name} | skipped: {remaining:.0f} s left, expects {part.seconds:.0f} s |",
                    flush=True,
                )
                continue
            started = time.monotonic()
            ended = run_part(part, part_args(part, args.toy, remaining), remaining, output, log)
            print(f"# {part.name}: {ended} in {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
