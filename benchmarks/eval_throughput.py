"""Evaluation throughput end to end: the `evaluate` entry point, process start, model load and compilation
included, with the fast constrained decoder against Hugging Face `generate`.

    python benchmarks/eval_throughput.py                  # one H200: the issue's workload, about 6 minutes
    python benchmarks/eval_throughput.py --rows generate,fast-N0           # finish a run a time limit cut
    python benchmarks/eval_throughput.py --device cpu --preset tiny-qwen3 --problems 4 --samples 2 \\
        --new-tokens 16 --baseline-problems 2 --hf-problems 1   # a toy run that checks the script on a CPU

Rows, each its own `python -m entrypoints.evaluate` process (so no compiled graph or allocation carries over):
- `fast`: the preset with N = --reasoning-vocab-size reasoning rows, `--problems` synthetic problems x
  `--samples` samples x `--new-tokens` new tokens at T = 0.6, top-p 0.95, batch size auto;
- `fast-warm`: `fast` again in a new process after it, so compilation reads the kernel cache the first left
  (`$RLVR_CACHE`), as a second evaluation on the same machine does;
- `fast N=0`: the same at N = 0, on `--baseline-problems` problems (its sustained rate is what compares);
- `generate`: N as in `fast` through HF `generate` (`fast_decoding=false`), on `--hf-problems` problems, all
  their samples in one batch.
Random weights never emit EOS, so every sample decodes all its tokens. The models are saved (bf16 on a GPU) to
a scratch directory first, so each row loads its model from disk as a registered model would be. Metrics are
read back from the rows' MLflow runs (a sqlite store in the scratch directory unless MLFLOW_TRACKING_URI is
set): `end-to-end tok/s` is completion tokens over the row's wall time, `sampling tok/s` the rate over the
sampling phase alone (first prefill and compilation included), as `progress/completion_tokens_per_s` logs it.
Prints one JSON line per row as it ends, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def save_preset(preset: str, reasoning_vocab_size: int, directory: Path, gpu: bool) -> Path:
    import torch

    from rlvr.models import load_model, save_model

    dtype = torch.bfloat16 if gpu else torch.float32
    model, tokenizer = load_model(preset, reasoning_vocab_size=reasoning_vocab_size, dtype=dtype)
    return save_model(model, tokenizer, directory)


def run_row(name: str, model: Path, problems: int, args, env: dict, extra: list[str]) -> dict:
    experiment = f"eval-throughput-{name.replace(' ', '-').replace('=', '')}"
    data = f"synthetic:count={problems},digits=3,min_ops=2,max_ops=4"
    command = [
        sys.executable, "-m", "entrypoints.evaluate", "--model", str(model), "--data", data,
        "--num_samples", str(args.samples), "--max_new_tokens", str(args.new_tokens), "--temperature", "0.6",
        "--top_p", "0.95", *extra,
    ]  # fmt: skip
    started, started_at = time.perf_counter(), time.time()
    # the row's log and progress bar go straight to this process's stderr, so a run stopped by a time limit
    # still shows how far each row got and at what rate
    done = subprocess.run(command, cwd=ROOT, env={**env, "MLFLOW_EXPERIMENT_NAME": experiment}, check=False,
                          stdout=subprocess.PIPE, text=True)  # fmt: skip
    wall, ended_at = time.perf_counter() - started, time.time()
    if done.returncode:
        raise SystemExit(f"row {name} failed with exit status {done.returncode}: its log is above")
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1)
    metrics = run.data.metrics
    tokens = metrics["progress/completion_tokens"]
    row = {
        "row": name,
        "reasoning_vocab_size": int(run.data.params["reasoning_vocab_size"]),
        "workload": f"{problems} x {args.samples} x {args.new_tokens}",
        "wall_s": round(wall, 1),
        "completion_tokens": int(tokens),
        "end_to_end_tok_s": round(tokens / wall),
        "sampling_tok_s": round(metrics["progress/completion_tokens_per_s"]),
        "truncation_rate": metrics["eval/synthetic/truncation_rate"],
    }
    # the fast decoder's loop: the host's seconds by part (rlvr.rollout.LoopTimes)
    loop = {k.split("/", 1)[1]: round(v, 3) for k, v in metrics.items() if k.startswith("decode/")}
    if loop:
        row["decode_loop"] = loop
    # the model's evaluation by phase (rlvr.evaluation.Phases); `rest`: the process's start, imports, the
    # run's setup and the problems' preparation, which no phase covers
    phases = {k.split("/", 1)[1]: round(v, 2) for k, v in metrics.items() if k.startswith("time/")}
    if phases:
        # the rest split by the MLflow run's own start and end: before it (interpreter, imports), inside it
        # outside every phase (problems, tokenizing, parameters), after it (the process's exit)
        before = run.info.start_time / 1000 - started_at
        after = ended_at - run.info.end_time / 1000
        rest = wall - sum(phases.values())
        row["phases_s"] = {
            **phases, "rest_s": round(rest, 2), "rest_before_run_s": round(before, 2),
            "rest_in_run_s": round(rest - before - after, 2), "rest_after_run_s": round(after, 2),
        }  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="qwen3-0.6b-shape")
    parser.add_argument("--reasoning-vocab-size", type=int, default=151646)
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument(
        "--baseline-problems", type=int, default=125, help="problems of the N = 0 row (0: none)"
    )
    parser.add_argument("--hf-problems", type=int, default=2, help="problems of the generate row (0: none)")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto")
    parser.add_argument(
        "--rows", default="fast,generate,fast-N0",
        help="rows to run (comma-separated), always in the order fast, fast-warm, generate, fast-N0",
    )  # fmt: skip
    args = parser.parse_args()
    rows_asked = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows_asked) - {"fast", "fast-warm", "generate", "fast-N0"})
    if unknown or not rows_asked:
        parser.error(
            f"--rows {args.rows!r}: unknown or no row {unknown}; "
            "choose among fast, fast-warm, generate, fast-N0"
        )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        rows = []
        fast_rows = {"fast", "fast-warm"} & set(rows_asked)
        if fast_rows or ("generate" in rows_asked and args.hf_problems):
            reasoning = save_preset(args.preset, args.reasoning_vocab_size, root / "reasoning", gpu)
        for name in ("fast", "fast-warm"):
            if name in rows_asked:
                rows.append(run_row(name.replace("-", " "), reasoning, args.problems, args, env, []))
        if "generate" in rows_asked and args.hf_problems:
            batch = ["--batch_size", str(args.hf_problems * args.samples), "--fast_decoding", "false"]
            rows.append(run_row("generate", reasoning, args.hf_problems, args, env, batch))
        if "fast-N0" in rows_asked and args.baseline_problems:
            baseline = save_preset(args.preset, 0, root / "baseline", gpu)
            rows.append(run_row("fast N=0", baseline, args.baseline_problems, args, env, []))
    device = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"\n{args.preset} on {device}, torch {torch.__version__}, T = 0.6, top-p 0.95\n")
    columns = ["row", "reasoning_vocab_size", "workload", "wall_s", "completion_tokens", "end_to_end_tok_s",
               "sampling_tok_s"]  # fmt: skip
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
