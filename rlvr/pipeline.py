"""The `main` pipeline: the whole offline experiment, each step an MLflow child run of the `main` run.

preprocess (synthetic) -> warmstart (micro) -> train_baseline and train_reasoning from the warm start ->
evaluate the warm start and both arms on the held-out split -> a comparison table -> the better arm gets the
registry alias `champion`. A scale without a warm start (`pretrained`) trains both arms from a named model,
`start`, instead. Steps pass each other MLflow URIs (`runs:/<id>/data`, `models:/<name>/<version>`),
so the lineage is in the tracking server, not on one disk. A step whose identical run (same entry point,
parameters and code) already finished is reused, not rerun.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from rlvr import statistics
from rlvr.dataset import DATA_ARTIFACT_PATH
from rlvr.errors import InputError
from rlvr.evaluation import SAMPLES_TABLE, metrics_by_label
from rlvr.settings import param
from rlvr.tracking import registry
from rlvr.tracking.params import log_params
from rlvr.tracking.runs import PROCESS, RESUMED_INTO, STEP_KEY, entrypoint_run, this_process

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[1]
CHAMPION = "champion"
EXPERIMENT = "rlvr-demo"  # where `main` runs unless the user names an experiment

# The pretrained scales' problems: two reasoning-gym generators at a difficulty that a 135M chat model partly
# solves (2 terms of 1-2 digits added or subtracted; sums of 2-3 such terms).
PRETRAINED_PROBLEMS = (
    "reasoning_gym:basic_arithmetic=0.6+chain_sum=0.4,basic_arithmetic.max_terms=2,"
    "basic_arithmetic.max_digits=2,basic_arithmetic.operators=+-,basic_arithmetic.allow_parentheses=false,"
    "basic_arithmetic.allow_negation=false,chain_sum.max_terms=3,chain_sum.max_digits=2"
)
PRETRAINED_INSTRUCTION = "Put the final answer in \\boxed{}."

# Per scale: the parameters of every step. `demo` is the experiment (10 minutes on 2 CPU cores); `gpu` a
# larger one (about 10 minutes on one H200); `pretrained` a real pretrained model on one GPU; `ci` and
# `pretrained-ci` the same pipelines shrunk to smoke runs.
SCALES: dict[str, dict[str, dict[str, object]]] = {
    # The warm start imitates a noisy teacher (30% of its worked solutions have one wrong step, `errors=0.3`),
    # as distilled traces do, so GRPO's verifiable reward has something to correct. BENCHMARKS.md records the
    # settings tried before these and what each gave.
    "demo": {
        "preprocess": {
            "source": "synthetic:count=6000,digits=1,errors=0.3",
            "test_size": 200,
            "instruction": "",
        },
        "warmstart": {
            "model": "micro",
            "max_steps": 1200,
            "learning_rate": 1.2e-3,
            "per_device_train_batch_size": 16,
            "save_steps": 400,
        },
        # 16 prompts x 4 completions a step: more prompts make a steadier gradient than larger groups.
        "train": {
            "max_steps": 150,
            "learning_rate": 1e-4,
            "per_device_train_batch_size": 16,
            "gradient_accumulation_steps": 4,
            "num_generations": 4,
            "max_completion_length": 48,
            "temperature": 1.0,
            "save_steps": 75,
            "log_completions_steps": 25,
            "format_weight": 0.5,
        },
        "evaluate": {
            "num_samples": 4,
            "temperature": 1.0,
            "top_p": 1.0,
            "max_new_tokens": 48,
            "max_examples": 200,
        },
    },
    # The ~25M-parameter `small` preset on 2-3 step problems over 1-2 digit numbers (results up to 4 digits),
    # with the same noisy teacher and fast rollouts; BENCHMARKS.md has what it gains.
    "gpu": {
        "preprocess": {
            "source": "synthetic:count=40000,digits=2,min_ops=2,max_ops=3,errors=0.3",
            "test_size": 500,
            "instruction": "",
        },
        "warmstart": {
            "model": "small",
            "max_steps": 1500,
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 64,
            "save_steps": 500,
        },
        "train": {
            "max_steps": 100,
            "learning_rate": 3e-5,
            "per_device_train_batch_size": 64,
            "gradient_accumulation_steps": 4,
            "num_generations": 8,
            "max_completion_length": 128,
            "temperature": 1.0,
            "save_steps": 50,
            "log_completions_steps": 50,
            "format_weight": 0.5,
            "fast_rollouts": "true",
        },
        "evaluate": {
            "num_samples": 4,
            "temperature": 1.0,
            "top_p": 1.0,
            "max_new_tokens": 128,
            "max_examples": 500,
        },
    },
    # A real pretrained chat model (SmolLM2-135M-Instruct, 4-bit-dequantized) on reasoning-gym arithmetic,
    # without a warm start: GRPO from the instruct model itself. It rarely writes \boxed{}, so it is asked to,
    # and rewarded on the lenient reading (its final number) with a bonus for the boxed one; both accuracies
    # are reported (README has where the instruct model starts). main's `grpo_steps` sets other GRPO steps.
    "pretrained": {
        "preprocess": {
            "source": PRETRAINED_PROBLEMS + ",count=8000",
            "test_size": 500,
            "instruction": PRETRAINED_INSTRUCTION,
        },
        "start": {"model": "smollm2-135m-instruct"},
        "train": {
            "max_steps": 120,
            "learning_rate": 1e-5,
            "per_device_train_batch_size": 64,
            "gradient_accumulation_steps": 2,
            "num_generations": 8,
            "max_completion_length": 96,
            "temperature": 0.7,
            "save_steps": 40,  # where a run cut short (a 10-minute GPU call) resumes
            "log_completions_steps": 40,
            "rewards": "lenient:1,accuracy:0.5",
            "fast_rollouts": "true",
        },
        "evaluate": {
            "num_samples": 4,
            "temperature": 0.7,
            "top_p": 1.0,
            "max_new_tokens": 96,
            "max_examples": 500,
        },
    },
    "ci": {
        "preprocess": {"source": "synthetic:count=300,errors=0.3", "test_size": 20, "instruction": ""},
        "warmstart": {
            "model": "micro",
            "max_steps": 20,
            "learning_rate": 3e-3,
            "per_device_train_batch_size": 16,
            "save_steps": 10,
        },
        "train": {
            "max_steps": 2,
            "learning_rate": 5e-5,
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1,
            "num_generations": 4,
            "max_completion_length": 16,
            "save_steps": 1,
            "log_completions_steps": 1,
        },
        "evaluate": {
            "num_samples": 2,
            "temperature": 0.6,
            "top_p": 1.0,
            "max_new_tokens": 16,
            "max_examples": 10,
        },
    },
    # The pretrained path shrunk to a smoke run on a CPU: the real model and generators, a few tokens.
    "pretrained-ci": {
        "preprocess": {
            "source": PRETRAINED_PROBLEMS + ",count=40",
            "test_size": 4,
            "instruction": PRETRAINED_INSTRUCTION,
        },
        "start": {"model": "smollm2-135m-instruct"},
        "train": {
            "max_steps": 1,
            "learning_rate": 1e-5,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "num_generations": 2,
            "max_completion_length": 8,
            "temperature": 0.7,
            "save_steps": 10,  # no checkpoint but checkpoint-0: a 135M model's optimizer state is 1 GB
            "log_completions_steps": 1,
            "rewards": "lenient:1,accuracy:0.5",
        },
        "evaluate": {
            "num_samples": 1,
            "temperature": 0.7,
            "top_p": 1.0,
            "max_new_tokens": 8,
            "batch_size": 4,
            "max_examples": 4,
        },
    },
}


@dataclass
class PipelineSettings:
    """Every parameter of the `main` entry point, with its one default."""

    scale: str = param(
        "demo",
        "demo (the offline experiment, minutes on 2 CPU cores), gpu (a larger one, minutes on one "
        "GPU), pretrained (SmolLM2-135M-Instruct on reasoning-gym problems, one GPU), or ci and "
        "pretrained-ci (smoke runs)",
    )
    reasoning_vocab_size: int = param(
        0, "N of the reasoning arm (0: every token id of the scale's tokenizer)"
    )
    registered_model_name: str = param(
        "rlvr-demo", "both arms register here; the better one becomes @champion"
    )
    output_dir: str = param("outputs/main", "checkpoints and data of the steps go under this directory")
    seeds: str = param("0", "comma-separated seeds; each runs its own warm start, arms and evaluations")
    grpo_steps: int = param(0, "GRPO steps of each arm (0: the scale's own)")


def _code_version() -> str:
    """The checkout's commit (and whether it is dirty), so a reused run was made by the same code."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_DIR,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}{'-dirty' if dirty else ''}"


class Pipeline:
    """Runs steps as child runs of the active `main` run, reusing finished identical ones."""

    def __init__(self, settings: PipelineSettings):
        self.settings = settings
        self.client = MlflowClient()
        self.parent = mlflow.active_run()
        self.experiment_id = self.parent.info.experiment_id
        self.code = _code_version()
        self.root = Path(settings.output_dir)

    def step(
        self, entry_point: str, parameters: dict[str, object], writes_files: bool = True, name: str = ""
    ) -> str:
        """Run `entry_point` (or reuse its finished twin) as a child run named `name` (default: the entry
        point); returns the child run's id.

        A step that writes files gets an `output_dir` of its own under the pipeline's, named by its key, so
        steps with other parameters never meet a finished training in their directory.
        """
        parameters = {k: str(v) for k, v in parameters.items()}
        key = hashlib.sha256(
            json.dumps([entry_point, parameters, self.code], sort_keys=True).encode()
        ).hexdigest()
        if writes_files:
            parameters["output_dir"] = str(self.root / entry_point / key[:12])
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{STEP_KEY}` = '{key}' and attributes.status = 'FINISHED'",
            max_results=1,
        )
        if found:
            log.info("%s: reusing finished run %s", entry_point, found[0].info.run_id)
            self.client.set_tag(found[0].info.run_id, f"rlvr.reused_by.{self.parent.info.run_id}", "true")
            return found[0].info.run_id
        # The child carries this process until the step's own process takes it over.
        child = self.client.create_run(
            self.experiment_id,
            run_name=name or entry_point,
            tags={
                "mlflow.parentRunId": self.parent.info.run_id,
                STEP_KEY: key,
                "rlvr.code": self.code,
                PROCESS: this_process(),
            },
        )
        log.info("%s: starting run %s", entry_point, child.info.run_id)
        # `mlflow run` runs as a plain child, in main's process group (mlflow.projects.run would start it in a
        # session of its own): Ctrl-C, a SIGKILL of the group or a SLURM cancel stops the step with main. The
        # experiment is passed as an id only: with MLFLOW_EXPERIMENT_NAME also set, `mlflow run` would refuse
        # the pair.
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(PROJECT_DIR),
            "-e",
            entry_point,
            "--env-manager",
            "local",
            "--run-id",
            child.info.run_id,
            "--experiment-id",
            self.experiment_id,
        ]
        for k, v in parameters.items():
            command += ["-P", f"{k}={v}"]
        env = {
            k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")
        }
        if subprocess.run(command, cwd=PROJECT_DIR, env=env, check=False).returncode:
            if self.client.get_run(child.info.run_id).info.status == "RUNNING":  # it died before adopting it
                self.client.set_terminated(child.info.run_id, "FAILED")
            raise InputError(
                f"step {entry_point} failed (run {child.info.run_id}); its log is in the run's output above."
            )
        # a training killed earlier resumes into its first run; the new child then only points to it
        return self.client.get_run(child.info.run_id).data.tags.get(RESUMED_INTO, child.info.run_id)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(item) for item in str(text).replace(" ", "").split(",") if item]
    except ValueError as error:
        raise InputError(
            f"seeds={text!r} is not a comma-separated list of integers, e.g. seeds=0,1,2."
        ) from error
    if not seeds or len(set(seeds)) != len(seeds):
        raise InputError(f"seeds={text!r} must name at least one seed, each once.")
    return seeds


@dataclass
class Outcome:
    """What `main` found: pooled metrics per model, per-seed metrics, the paired comparisons, the champion."""

    results: dict[str, dict]
    per_seed: dict[int, dict[str, dict]]
    comparisons: dict[str, statistics.Paired]
    champion: str
    # Per seed, the same comparisons; empty for one seed.
    seed_comparisons: dict[int, dict[str, statistics.Paired]] = field(default_factory=dict)


START = "start"  # the label of the model both arms train from, where a scale has no warm start
STEP_OF = {
    "warmstart": "warmstart",
    START: START,
    "baseline": "train_baseline",
    "reasoning": "train_reasoning",
}
METRICS = (
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "lenient_accuracy",
    "lenient_accuracy_ci_low",
    "lenient_accuracy_ci_high",
    "pass_at_1",
    "format_rate",
    "reasoning_share",
)
# Per verdict, the samples-table column that judges a sample and the metric of its accuracy
VERDICTS = {"correct": "accuracy", "lenient_correct": "lenient_accuracy"}
# (metric prefix, model A, model B, verdict): B minus A, paired by (seed, problem); None as A is the starting
# model (the warm start, or the model the scale names)
COMPARISONS = (
    ("baseline/gain", None, "baseline", "correct"),
    ("reasoning/gain", None, "reasoning", "correct"),
    ("reasoning_vs_baseline/diff", "baseline", "reasoning", "correct"),
    ("baseline/lenient_gain", None, "baseline", "lenient_correct"),
    ("reasoning/lenient_gain", None, "reasoning", "lenient_correct"),
    ("reasoning_vs_baseline/lenient_diff", "baseline", "reasoning", "lenient_correct"),
)


def run_pipeline(settings: PipelineSettings) -> Outcome:
    """Run every step at `settings.scale` for each seed; returns held-out metrics, paired comparisons,
    champion."""
    if settings.scale not in SCALES:
        raise InputError(f"scale={settings.scale!r} is not one of {', '.join(SCALES)}.")
    if settings.grpo_steps < 0:
        raise InputError(f"grpo_steps={settings.grpo_steps} is negative; pass 0 for the scale's own.")
    from rlvr.models import tokenizer_size

    seeds = parse_seeds(settings.seeds)
    plan = SCALES[settings.scale]
    if settings.grpo_steps:
        plan = {**plan, "train": {**plan["train"], "max_steps": settings.grpo_steps}}
    name = settings.registered_model_name
    if not name.strip():
        raise InputError("registered_model_name is empty; both arms register under it: pass e.g. rlvr-demo.")
    base_model = plan.get("warmstart", plan.get(START))["model"]
    token_ids = tokenizer_size(base_model)
    if not 0 <= settings.reasoning_vocab_size <= token_ids:
        raise InputError(
            f"reasoning_vocab_size={settings.reasoning_vocab_size} is not in 0..{token_ids}, the token ids "
            f"of the {base_model} model at scale {settings.scale}; pass 0 to copy every one."
        )
    size = settings.reasoning_vocab_size or token_ids
    with entrypoint_run(
        run_name="main",
        tags={"rlvr.step": "main", "rlvr.scale": settings.scale},
        default_experiment=EXPERIMENT,
    ):
        log_params(
            {
                "scale": settings.scale,
                "reasoning_vocab_size": size,
                "registered_model_name": name,
                "output_dir": settings.output_dir,
                "seeds": ",".join(map(str, seeds)),
                "grpo_steps": plan["train"]["max_steps"],
            }
        )
        pipeline = Pipeline(settings)
        # one data set for every seed, so that seeds vary training and sampling, and pair on the same problems
        preprocessed = pipeline.step("preprocess", {**plan["preprocess"], "seed": seeds[0]})
        data = f"runs:/{preprocessed}/{DATA_ARTIFACT_PATH}"
        per_seed, problems, models = {}, {}, {}
        for seed in seeds:
            suffix = f" seed {seed}" if len(seeds) > 1 else ""
            models[seed] = _train_arms(pipeline, plan, data, seed, name, size, suffix)
            per_seed[seed] = {}
            for label, model in models[seed].items():
                run = pipeline.step(
                    "evaluate",
                    {**plan["evaluate"], "model": model, "data": data, "seed": seed},
                    writes_files=False,
                    name=f"evaluate {STEP_OF[label]}{suffix}",
                )
                per_seed[seed][label] = {
                    **_held_out_metrics(pipeline.client.get_run(run).data.metrics),
                    "model": model,
                }
                table = mlflow.load_table(SAMPLES_TABLE, run_ids=[run])
                for verdict in VERDICTS:
                    problems[seed, label, verdict] = statistics.per_problem_accuracy(table, verdict)
        outcome = _outcome(per_seed, problems, seeds)
        version = models[seeds[0]][outcome.champion].rsplit("/", 1)[1]
        registry.set_alias(name, CHAMPION, version)
        _log_outcome(outcome, seeds)
        mlflow.set_tags({"rlvr.champion": f"models:/{name}/{version}"})
        mlflow.log_text(comparison_table(outcome), "comparison.md")
    return outcome


def _train_arms(
    pipeline: Pipeline, plan: dict, data: str, seed: int, name: str, size: int, suffix: str
) -> dict[str, str]:
    """The starting model (the warm start, or the scale's `start` model as named) and both GRPO arms of one
    seed: registered model URIs (child runs named with `suffix`), the starting model first."""
    if "warmstart" in plan:
        warm_name = f"{name}-warmstart"
        warm_run = pipeline.step(
            "warmstart",
            {**plan["warmstart"], "data": data, "seed": seed, "registered_model_name": warm_name},
            name=f"warmstart{suffix}",
        )
        models = {"warmstart": f"models:/{warm_name}/{registry.version_registered_by(warm_run, warm_name)}"}
    else:
        models = {START: plan[START]["model"]}
    start = next(iter(models.values()))
    for arm, n in (("baseline", 0), ("reasoning", size)):
        parameters = {
            **plan["train"],
            "model": start,
            "data": data,
            "seed": seed,
            "registered_model_name": name,
        }
        if arm == "reasoning":
            parameters["reasoning_vocab_size"] = n
        run = pipeline.step(f"train_{arm}", parameters, name=f"train_{arm}{suffix}")
        models[arm] = f"models:/{name}/{registry.version_registered_by(run, name)}"
    return models


def _held_out_metrics(logged: dict[str, float]) -> dict[str, float]:
    held_out = next(m for m in metrics_by_label(logged).values() if "accuracy" in m)
    return {m: held_out[m] for m in METRICS}


def _outcome(per_seed: dict[int, dict[str, dict]], problems: dict, seeds: list[int]) -> Outcome:
    """Accuracy pooled over seeds, and paired comparisons of the models on the same problems
    (`rlvr.statistics`)."""

    def pooled(label: str, verdict: str) -> pd.Series:
        return pd.concat({seed: problems[seed, label, verdict] for seed in seeds}, names=["seed"])

    results = {}
    for label in per_seed[seeds[0]]:
        results[label] = {m: sum(per_seed[s][label][m] for s in seeds) / len(seeds) for m in METRICS}
        if len(seeds) > 1:  # over seeds: the pooled mean, with an interval that resamples problems
            for verdict, metric in VERDICTS.items():
                results[label][metric] = float(pooled(label, verdict).mean())
                low, high = statistics.mean_interval(pooled(label, verdict))
                results[label][f"{metric}_ci_low"], results[label][f"{metric}_ci_high"] = low, high
        results[label]["model"] = per_seed[seeds[0]][label]["model"]
    comparisons = {
        prefix: statistics.paired(pooled(a, verdict), pooled(b, verdict))
        for prefix, a, b, verdict in _comparisons(per_seed[seeds[0]])
    }
    by_seed = (
        {
            seed: {
                prefix: statistics.paired(problems[seed, a, verdict], problems[seed, b, verdict])
                for prefix, a, b, verdict in _comparisons(per_seed[seeds[0]])
            }
            for seed in seeds
        }
        if len(seeds) > 1
        else {}
    )
    # strict accuracy decides; where it ties (a model that never boxes its answer), the lenient one
    champion = max(
        ("baseline", "reasoning"),
        key=lambda arm: (results[arm]["accuracy"], results[arm]["lenient_accuracy"]),
    )
    return Outcome(results, per_seed, comparisons, champion, by_seed)


def _comparisons(models: dict) -> list[tuple[str, str, str, str]]:
    """`COMPARISONS` with the starting model (the first of `models`) in place of None."""
    start = next(iter(models))
    return [(prefix, a or start, b, verdict) for prefix, a, b, verdict in COMPARISONS]


def _log_outcome(outcome: Outcome, seeds: list[int]) -> None:
    for label, values in outcome.results.items():
        mlflow.log_metrics({f"{label}/{k}": v for k, v in values.items() if isinstance(v, float)})
    if len(seeds) > 1:
        for seed, results in outcome.per_seed.items():
            for label, values in results.items():
                mlflow.log_metrics(
                    {f"{label}/seed_{seed}/{k}": v for k, v in values.items() if isinstance(v, float)}
                )
    for prefix, comparison in outcome.comparisons.items():
        mlflow.log_metrics(comparison.as_metrics(prefix))
    for seed, comparisons in outcome.seed_comparisons.items():  # e.g. baseline/seed_0/gain
        for prefix, comparison in comparisons.items():
            mlflow.log_metrics(comparison.as_metrics(prefix.replace("/", f"/seed_{seed}/")))


def comparison_table(outcome: Outcome) -> str:
    """Markdown: each model's held-out metrics (pooled over seeds), per-seed accuracies (strict and lenient),
    and the paired comparisons of both."""
    lines = ["| model | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 1)]
    for label, values in outcome.results.items():
        mark = f"{label} ({CHAMPION})" if label == outcome.champion else label
        lines.append(f"| {mark} | " + " | ".join(f"{values[m]:.3f}" for m in METRICS) + " |")
    if len(outcome.per_seed) > 1:
        lines += [
            "",
            "| seed | " + " | ".join(f"{label} accuracy / lenient" for label in outcome.results) + " |",
            "|" + "---|" * (len(outcome.results) + 1),
        ]
        for seed, results in outcome.per_seed.items():
            cells = [f"{results[m]['accuracy']:.3f} / {results[m]['lenient_accuracy']:.3f}" for m in results]
            lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| paired comparison (B - A) | difference | 95% interval | p-value | problems |",
        "|---|---|---|---|---|",
    ]
    rows = [("", outcome.comparisons)] + [(f", seed {s}", c) for s, c in outcome.seed_comparisons.items()]
    for suffix, comparisons in rows:
        for prefix, a, b, _ in _comparisons(outcome.results):
            c = comparisons[prefix]
            lines.append(
                f"| {prefix}{suffix}: {b} - {a} | {c.diff:+.3f} | [{c.ci_low:+.3f}, {c.ci_high:+.3f}] | "
                f"{c.p_value:.3g} | {c.units} |"
            )
    return "\n".join(lines) + "\n"
