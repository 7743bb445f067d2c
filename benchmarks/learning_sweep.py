"""One point of a learning sweep: warm start (cached by its settings), optional GRPO, held-out evaluation.

    python benchmarks/learning_sweep.py --name ref --train "{}" python benchmarks/learning_sweep.py --name
    lr2e4 --train "{learning_rate: 2.0e-4}" --seed 1 python benchmarks/learning_sweep.py --name gpu --model
    small --source synthetic:count=20000,digits=2,max_ops=3 \
        --warm "{max_steps: 2000, per_device_train_batch_size: 64}" --train "{num_generations: 8}" --eval_n
        500

`--warm` and `--train` are YAML mappings over the demo's warm-start and GRPO settings (`rlvr.pipeline`'s
`demo` scale, or `--scale`); the same `--warm`, `--source` and `--seed` reuse one warm start under `--root`.
Evaluation is the demo's (T = 1, top-p 1, 4 samples) on the first `--eval_n` held-out problems. Prints and
appends to `<root>/results.jsonl` one JSON line: the warm start's and the trained model's held-out metrics,
times, and GRPO's curves (reward, accuracy reward, `frac_reward_zero_std`, entropy, length) in five windows.
Tracking goes to `<root>/mlflow.db` unless MLFLOW_TRACKING_URI is set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import yaml

CURVES = (
    "reward",
    "rewards/accuracy_reward/mean",
    "frac_reward_zero_std",
    "entropy",
    "completions/mean_length",
    "grad_norm",
)
KEEP = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "pass_at_4", "format_rate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--root", default="/tmp/learning-sweep")
    parser.add_argument("--scale", default="demo")
    parser.add_argument("--model", default="")
    parser.add_argument("--source", default="")
    parser.add_argument("--test_size", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm", default="{}")
    parser.add_argument("--train", default="", help="GRPO overrides; empty: evaluate the warm start only")
    parser.add_argument("--eval", default="{}", help="evaluation overrides")
    parser.add_argument("--eval_n", type=int, default=0)
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root.resolve()}/mlflow.db")
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "learning-sweep")

    from mlflow.tracking import MlflowClient

    from rlvr.evaluation import EvalSettings, evaluate
    from rlvr.grpo import TrainSettings, train
    from rlvr.pipeline import SCALES
    from rlvr.preprocess import Options, preprocess
    from rlvr.sft import WarmstartSettings, warmstart

    plan = SCALES[args.scale]
    source = args.source or plan["preprocess"]["source"]
    test_size = args.test_size or plan["preprocess"]["test_size"]
    data = root / ("data-" + _digest([source, test_size]))
    if not data.exists():
        preprocess(source, data, Options(test_size=test_size, instruction="", seed=0))
    warm_settings = {**plan["warmstart"], "save_steps": 10**6, **yaml.safe_load(args.warm)}
    if args.model:
        warm_settings["model"] = args.model
    warm = root / ("warm-" + _digest([source, test_size, warm_settings, args.seed]))
    result: dict = {"name": args.name, "seed": args.seed, "source": source, "warm_settings": warm_settings}
    started = time.time()
    if not (warm / "final").exists():
        warmstart(
            WarmstartSettings(
                **warm_settings,
                data=str(data),
                seed=args.seed,
                output_dir=str(warm),
                registered_model_name="",
            )
        )
    result["warm_time_s"] = round(time.time() - started, 1)
    evaluation = {**plan["evaluate"], **yaml.safe_load(args.eval)}
    if args.eval_n:
        evaluation["max_examples"] = args.eval_n

    def held_out(model: str) -> dict:
        found = evaluate(EvalSettings(**evaluation, model=model, data=str(data), seed=args.seed))
        return {k: round(v, 4) for k, v in next(iter(found.metrics[model].values())).items() if k in KEEP}

    cached = warm / f"eval-{_digest(evaluation)}.json"
    if not cached.exists():
        cached.write_text(json.dumps(held_out(str(warm / "final"))))
    result["warm"] = json.loads(cached.read_text())
    print("WARM", json.dumps({k: result[k] for k in ("name", "seed", "warm_time_s", "warm")}), flush=True)
    if args.train:
        overrides = yaml.safe_load(args.train) or {}
        settings = {**plan["train"], "save_steps": 10**6, "log_completions_steps": 0, **overrides}
        result["train_settings"] = overrides
        output = root / f"grpo-{args.name}-{args.seed}"
        started = time.time()
        train(
            TrainSettings(
                **settings,
                model=str(warm / "final"),
                data=str(data),
                seed=args.seed,
                output_dir=str(output),
                registered_model_name="",
            )
        )
        result["train_time_s"] = round(time.time() - started, 1)
        run_id = json.loads((output / "mlflow_run.json").read_text())["run_id"]
        client = MlflowClient()
        for key in CURVES:
            values = [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
            if values:
                width = max(1, len(values) // 5)
                result[key] = [
                    round(statistics.mean(values[i : i + width]), 3) for i in range(0, len(values), width)
                ]
        result["trained"] = held_out(str(output / "final"))
        result["gain"] = round(result["trained"]["accuracy"] - result["warm"]["accuracy"], 4)
    line = json.dumps(result)
    print("RESULT", line, flush=True)
    with open(root / "results.jsonl", "a") as out:
        out.write(line + "\n")


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


if __name__ == "__main__":
    main()
