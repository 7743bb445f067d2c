"""The `main` pipeline: the whole offline experiment, each step an MLflow child run of the `main` run.

preprocess (synthetic) -> warmstart (micro) -> train_baseline and train_reasoning from the warm start ->
evaluate the warm start and both arms on the held-out split -> a comparison table -> the better arm gets the
registry alias `champion`. Steps pass each other MLflow URIs (`runs:/<id>/data`, `models:/<name>/<version>`), so
the lineage is in the tracking server, not on one disk. A step whose identical run (same entry point, parameters
and code) already finished is reused, not rerun.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from rlvr import tracking
from rlvr.errors import InputError
from rlvr.training import param

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[1]
CHAMPION = "champion"

# Per scale: the parameters of every step. `demo` is the experiment (minutes on 2 CPU cores); `ci` the same
# pipeline shrunk to a smoke run.
SCALES: dict[str, dict[str, dict[str, object]]] = {
    "demo": {
        "preprocess": {"source": "synthetic:count=6000,digits=1", "test_size": 200, "instruction": ""},
        "warmstart": {"model": "micro", "max_steps": 800, "learning_rate": 1.2e-3, "per_device_train_batch_size": 16,
                      "save_steps": 400},
        # 16 prompts x 4 completions a step: at ~57% accuracy few groups of 4 are flat, and more prompts make a
        # steadier gradient than larger groups; above 1e-4 the policy degrades within 100 steps. 80 steps moved
        # held-out accuracy by ~2 points, 160 by ~11 (BENCHMARKS.md)
        "train": {"max_steps": 150, "learning_rate": 1e-4, "per_device_train_batch_size": 16,
                  "gradient_accumulation_steps": 4, "num_generations": 4, "max_completion_length": 48,
                  "temperature": 1.0, "save_steps": 75, "log_completions_steps": 25, "format_weight": 0.5},
        "evaluate": {"num_samples": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 48,
                     "batch_size": 64, "max_examples": 200},
    },
    "ci": {
        "preprocess": {"source": "synthetic:count=300", "test_size": 20, "instruction": ""},
        "warmstart": {"model": "micro", "max_steps": 20, "learning_rate": 3e-3, "per_device_train_batch_size": 16},
        "train": {"max_steps": 2, "learning_rate": 5e-5, "per_device_train_batch_size": 8,
                  "gradient_accumulation_steps": 1, "num_generations": 4, "max_completion_length": 16,
                  "save_steps": 1, "log_completions_steps": 1},
        "evaluate": {"num_samples": 2, "temperature": 0.6, "top_p": 1.0, "max_new_tokens": 16,
                     "batch_size": 32, "max_examples": 10},
    },
}


@dataclass
class PipelineSettings:
    """Every parameter of the `main` entry point, with its one default."""

    scale: str = param("demo", "demo (the offline experiment, minutes on 2 CPU cores) or ci (a smoke run)")
    reasoning_vocab_size: int = param(0, "N of the reasoning arm (0: every token id of the micro tokenizer)")
    registered_model_name: str = param("rlvr-demo", "both arms register here; the better one becomes @champion")
    output_dir: str = param("outputs/main", "checkpoints and data of the steps go under this directory")
    seed: int = param(0, "seed of every step")


def _code_version() -> str:
    """The checkout's commit (and whether it is dirty), so a reused run was made by the same code."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_DIR,
                               capture_output=True, text=True, check=True).stdout.strip()
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

    def step(self, entry_point: str, parameters: dict[str, object], writes_files: bool = True) -> str:
        """Run `entry_point` (or reuse its finished twin); returns the child run's id.

        A step that writes files gets an `output_dir` of its own under the pipeline's, named by its key, so
        steps with other parameters never meet a finished training in their directory.
        """
        parameters = {k: str(v) for k, v in parameters.items()}
        key = hashlib.sha256(json.dumps([entry_point, parameters, self.code], sort_keys=True).encode()).hexdigest()
        if writes_files:
            parameters["output_dir"] = str(self.root / entry_point / key[:12])
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`rlvr.step_key` = '{key}' and attributes.status = 'FINISHED'",
            max_results=1,
        )
        if found:
            log.info("%s: reusing finished run %s", entry_point, found[0].info.run_id)
            self.client.set_tag(found[0].info.run_id, f"rlvr.reused_by.{self.parent.info.run_id}", "true")
            return found[0].info.run_id
        child = self.client.create_run(
            self.experiment_id,
            run_name=entry_point,
            tags={"mlflow.parentRunId": self.parent.info.run_id, "rlvr.step_key": key, "rlvr.code": self.code},
        )
        log.info("%s: starting run %s", entry_point, child.info.run_id)
        submitted = mlflow.projects.run(
            str(PROJECT_DIR), entry_point=entry_point, parameters=parameters, env_manager="local",
            run_id=child.info.run_id, experiment_id=self.experiment_id, synchronous=False,
        )
        if not submitted.wait():
            raise InputError(f"step {entry_point} failed (run {child.info.run_id}); its log is in the run's output above.")
        return child.info.run_id

    def registered_version(self, run_id: str, name: str) -> str:
        versions = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if not versions:
            raise InputError(f"run {run_id} registered no version of {name}; check its training log.")
        return max(versions, key=lambda v: int(v.version)).version


def run_pipeline(settings: PipelineSettings) -> tuple[dict[str, dict], str]:
    """Run every step at `settings.scale`; returns held-out metrics per model and the champion arm."""
    if settings.scale not in SCALES:
        raise InputError(f"scale={settings.scale!r} is not one of {', '.join(SCALES)}.")
    from rlvr.presets import micro_tokenizer

    plan = SCALES[settings.scale]
    name = settings.registered_model_name
    size = settings.reasoning_vocab_size or len(micro_tokenizer())
    seed = settings.seed
    with tracking.entrypoint_run(run_name="main", tags={"rlvr.step": "main", "rlvr.scale": settings.scale}):
        tracking.log_params({"scale": settings.scale, "reasoning_vocab_size": size, "registered_model_name": name,
                             "output_dir": settings.output_dir, "seed": seed})
        pipeline = Pipeline(settings)
        data_run = pipeline.step("preprocess", {**plan["preprocess"], "seed": seed})
        data = f"runs:/{data_run}/data"
        warm_run = pipeline.step("warmstart", {**plan["warmstart"], "data": data, "seed": seed,
                                               "registered_model_name": f"{name}-warmstart"})
        warm = f"models:/{name}-warmstart/{pipeline.registered_version(warm_run, f'{name}-warmstart')}"
        arms = {}
        for arm, n in (("baseline", 0), ("reasoning", size)):
            parameters = {**plan["train"], "model": warm, "data": data, "seed": seed, "registered_model_name": name}
            if arm == "reasoning":
                parameters["reasoning_vocab_size"] = n
            run = pipeline.step(f"train_{arm}", parameters)
            arms[arm] = f"models:/{name}/{pipeline.registered_version(run, name)}"
        results = {}
        for label, model in (("warmstart", warm), *arms.items()):
            run = pipeline.step("evaluate", {**plan["evaluate"], "model": model, "data": data, "seed": seed},
                                writes_files=False)
            metrics = pipeline.client.get_run(run).data.metrics
            prefix = next(k.rsplit("/", 1)[0] for k in metrics if k.startswith("eval/") and k.endswith("/accuracy"))
            results[label] = {m: metrics[f"{prefix}/{m}"] for m in ("accuracy", "accuracy_ci_low",
                              "accuracy_ci_high", "pass_at_1", f"pass_at_{plan['evaluate']['num_samples']}",
                              "format_rate", "reasoning_share")}
            results[label]["model"] = model
        champion = max(arms, key=lambda arm: results[arm]["accuracy"])
        version = arms[champion].rsplit("/", 1)[1]
        pipeline.client.set_registered_model_alias(name, CHAMPION, version)
        for label, values in results.items():
            mlflow.log_metrics({f"{label}/{k}": v for k, v in values.items() if isinstance(v, float)})
        mlflow.set_tags({"rlvr.champion": arms[champion]})
        mlflow.log_text(comparison_table(results, champion), "comparison.md")
    return results, champion


def comparison_table(results: dict[str, dict], champion: str) -> str:
    metrics = [k for k in next(iter(results.values())) if k != "model"]
    header = "| model | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 1)]
    for label, values in results.items():
        mark = f"{label} ({CHAMPION})" if label == champion else label
        lines.append(f"| {mark} | " + " | ".join(f"{values[m]:.3f}" for m in metrics) + " |")
    return "\n".join(lines) + "\n"
