"""The `analyze` job: its settings, the plan every checkpoint is measured on, each run measured checkpoint
by checkpoint, and the tables and figures written and logged as artifacts of a new `analyze` run, which is
tagged with the runs it analysed; they get a tag pointing back at it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rlvr.analysis import plots
from rlvr.analysis.drift import (
    QUANTILES,
    embedding_matrices,
    project,
    start_distances,
    summarise,
    twin_distances,
)
from rlvr.analysis.entropy import teacher_forced, thought_entropy
from rlvr.analysis.families import Family, family_texts, token_families, token_items, token_label
from rlvr.analysis.runs import KEY, TrainingRun, held_out, resolve_run
from rlvr.analysis.usage import logged_shares, usage
from rlvr.errors import InputError, require_at_least_one
from rlvr.generation import Generated, as_messages, generate
from rlvr.models import load_model
from rlvr.rendering import latex_completion, markdown_completion
from rlvr.sampling import check_sampling
from rlvr.settings import param
from rlvr.surgery import make_faithful
from rlvr.tracking.params import log_params
from rlvr.tracking.runs import entrypoint_run, experiment_in_environment
from rlvr.tracking.server import check_tracking_server
from rlvr.vocab import ReasoningVocab

log = logging.getLogger(__name__)

TAG_PREFIX = "rlvr.analysis."  # + analyze run id, on each analysed run


@dataclass
class AnalyzeSettings:
    """Every parameter of the analyze entry point, with its one default."""

    training_run: str = param("", "the training run to analyse: runs:/<run_id> or its output_dir")
    baseline_run: str = param(
        "", "a run to compare with, usually the baseline (runs:/<run_id> or output_dir); empty: none"
    )
    data: str = param(
        "", "held-out prompts: a preprocess output (output_dir or runs:/ URI); empty: the training run's data"
    )
    split: str = param("test", "split of data whose prompts (and worked solutions) are used")
    max_prompts: int = param(8, "prompts used at each checkpoint (the first ones of the split)")
    num_samples: int = param(2, "completions sampled per prompt at each checkpoint")
    max_new_tokens: int = param(128, "tokens per completion at most, sampled or teacher-forced")
    temperature: float = param(
        1.0, "sampling temperature of the usage samples (0: greedy, with num_samples=1)"
    )
    tokens: str = param(
        "",
        "token families to trace: tokens or #<id>s separated by spaces, or a JSON list of "
        "strings and ids; empty: the most frequent tokens of the data's worked solutions",
    )
    max_checkpoints: int = param(
        0, "analyse at most this many checkpoints, evenly spaced, first and last kept (0: all)"
    )
    batch_size: int = param(16, "sequences per generate call or forward pass")
    seed: int = param(0, "seed of the sampling")


def validate(settings: AnalyzeSettings) -> None:
    """Checks that need no model, run or data, so a bad request fails in seconds."""
    if not settings.training_run.strip():
        raise InputError("training_run is empty; pass runs:/<run_id> of a training run, or its output_dir.")
    require_at_least_one(settings, "max_prompts", "num_samples", "max_new_tokens", "batch_size")
    check_sampling(settings.temperature, settings.num_samples)
    if settings.max_checkpoints < 0 or settings.max_checkpoints == 1:
        raise InputError(
            f"max_checkpoints={settings.max_checkpoints} cannot show change over training; pass 0 for every "
            "checkpoint or at least 2."
        )
    token_items(settings.tokens)


# --- one run, checkpoint by checkpoint ----------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What every checkpoint of every run is measured on."""

    prompts: list[list[dict]]
    prompt_ids: list[list[int]]
    forced: list[tuple[list[int], int]]
    families: list[Family]
    settings: AnalyzeSettings
    device: str | None


@dataclass
class Measurements:
    """Rows of the output tables, accumulated over runs and checkpoints."""

    usage: list[dict] = field(default_factory=list)
    drift: list[dict] = field(default_factory=list)
    family_drift: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    entropy: list[pd.DataFrame] = field(default_factory=list)
    sample: dict | None = None


def measure_run(run: TrainingRun, plan: Plan, out: Measurements) -> None:
    """Load each checkpoint of `run` once and add its measurements to `out`."""
    settings = plan.settings
    first: dict[str, torch.Tensor] = {}
    for step, path in run.checkpoints:
        log.info("analysing %s, checkpoint %s", run.label, step)
        model, tokenizer = load_model(str(path), device=plan.device)
        model.eval()
        vocab = model.reasoning_vocab
        key = run.key(step)
        generated = generate(
            model, tokenizer, plan.prompts, max_new_tokens=settings.max_new_tokens, seed=settings.seed,
            temperature=settings.temperature, num_samples=settings.num_samples,
            batch_size=settings.batch_size,
        )  # fmt: skip
        out.usage.append(key | usage(generated))
        pairs = [(i, g) for i, samples in enumerate(generated) for g in samples]
        sequences = plan.forced or [
            (plan.prompt_ids[i] + g.token_ids, len(plan.prompt_ids[i])) for i, g in pairs
        ]
        tokens, entropies = thought_entropy(model, sequences, tokenizer.pad_token_id, settings.batch_size)
        positions = pd.DataFrame({"token_id": tokens.numpy(), "entropy": entropies.numpy()})
        table = positions.groupby("token_id")["entropy"].agg(positions="size", mean_entropy="mean")
        table = table.reset_index()
        table = table.assign(
            **key,
            token=[token_label(tokenizer, i) for i in table["token_id"]],
            multiplicity=[vocab.multiplicity_of(i) for i in table["token_id"]],
        )
        out.entropy.append(table[[*KEY, "token_id", "token", "multiplicity", "positions", "mean_entropy"]])
        for matrix, weight in embedding_matrices(model).items():
            _measure_rows(matrix, weight, vocab, first, key, plan.families, out)
        if run.role == "training":
            index, best = max(pairs, key=lambda pair: pair[1].reasoning_tokens)
            out.sample = key | {"prompt": plan.prompts[index], "generated": best}
        del model, tokenizer, generated, pairs
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _measure_rows(
    matrix: str,
    weight: torch.Tensor,
    vocab: ReasoningVocab,
    first: dict[str, torch.Tensor],
    key: dict,
    families: Sequence[Family],
    out: Measurements,
) -> None:
    """Distances over all N rows are reduced to summaries at once, so no N x H copy outlives a checkpoint
    (except the first checkpoint's rows, which `start` distances need); the few family rows are kept whole,
    since PCA needs every checkpoint's rows together."""
    base = vocab.base_vocab_size
    distances: dict[str, torch.Tensor] = {}
    if vocab.size:
        if matrix not in first:
            first[matrix] = weight[base:].to("cpu", copy=True)
        distances = {
            "twin": twin_distances(weight, vocab),
            "start": start_distances(weight, first[matrix], vocab),
        }
        for measure, values in distances.items():
            out.drift.append(key | {"matrix": matrix, "measure": measure} | summarise(values))
    for family in families:
        copies = family.reasoning_ids if vocab.size else ()
        for token_id in (family.standard_id, *copies):
            entry = key | {
                "matrix": matrix,
                "family": family.label,
                "standard_id": family.standard_id,
                "token_id": token_id,
                "multiplicity": vocab.multiplicity_of(token_id),
            }
            out.rows.append(entry | {"vector": weight[token_id].float().cpu().numpy()})
            if token_id >= base:
                out.family_drift.append(
                    entry | {f"{m}_distance": d[token_id - base].item() for m, d in distances.items()}
                )


# --- outputs ------------------------------------------------------------------------------------------------
def write_outputs(out: Measurements, runs: Sequence[TrainingRun], directory: Path) -> dict[str, pd.DataFrame]:
    """Every table (CSV) and figure (PNG) under `directory`; returns the tables by name."""
    for part in ("usage", "drift", "entropy", "rendering"):
        (directory / part).mkdir(parents=True, exist_ok=True)
    usage_table = pd.DataFrame(out.usage)
    logged = logged_shares(runs)
    statistics = ["rows", "mean", "std", *QUANTILES, "max"]
    drift = pd.DataFrame(out.drift, columns=[*KEY, "matrix", "measure", *statistics])
    family_drift = pd.DataFrame(out.family_drift, columns=[
        *KEY, "matrix", "family", "standard_id", "token_id", "multiplicity", "twin_distance",
        "start_distance",
    ])  # fmt: skip
    pca = project(pd.DataFrame(out.rows))
    entropy_by_token = pd.concat(out.entropy, ignore_index=True)
    totals = entropy_by_token.assign(total=entropy_by_token["mean_entropy"] * entropy_by_token["positions"])
    entropy = totals.groupby(list(KEY), sort=False)[["positions", "total"]].sum().reset_index()
    entropy["mean_entropy"] = entropy.pop("total") / entropy["positions"]
    tables = {
        "usage/usage.csv": usage_table, "usage/usage_logged.csv": logged, "drift/drift.csv": drift,
        "drift/family_drift.csv": family_drift, "drift/embedding_pca.csv": pca,
        "entropy/entropy.csv": entropy, "entropy/entropy_by_token.csv": entropy_by_token,
    }  # fmt: skip
    for name, table in tables.items():
        table.to_csv(directory / name, index=False)
    plots.usage_share(usage_table, logged, directory / "usage/usage_share.png")
    plots.usage_stacked(usage_table, directory / "usage/usage_stacked.png")
    plots.cosine_drift(drift, directory / "drift/cosine_drift.png")
    plots.embedding_trajectories(pca, directory / "drift/embedding_pca.png")
    plots.family_trajectories(pca, directory / "drift/embedding_pca_families.png")
    plots.thought_entropy(entropy, entropy_by_token, directory / "entropy/entropy.png")
    if out.sample is not None:
        render_sample(out.sample, directory / "rendering")
    return tables


def render_sample(sample: dict, directory: Path) -> None:
    """The chosen completion as JSON, PNG, Markdown and LaTeX (and PDF when pdflatex is installed)."""
    generated: Generated = sample["generated"]
    question = next((m["content"] for m in reversed(sample["prompt"]) if m["role"] == "user"), "")
    title = f"{sample['label']}, step {sample['step']}: {question}"
    record = {k: v for k, v in sample.items() if k not in ("generated", "prompt")} | {
        "prompt": sample["prompt"], "text": generated.text, "token_ids": generated.token_ids,
        "spans": [dataclasses.astuple(s) for s in generated.spans],
        "reasoning_tokens": generated.reasoning_tokens, "thought_tokens": generated.thought_tokens,
    }  # fmt: skip
    (directory / "completion.json").write_text(json.dumps(record, indent=1))
    (directory / "completion.md").write_text(
        f"### {title}\n\n" + markdown_completion(generated.text, generated.spans)
    )
    (directory / "completion.tex").write_text(latex_completion(generated.text, generated.spans))
    plots.completion(generated.text, generated.spans, title, directory / "completion.png")
    if shutil.which("pdflatex"):
        _compile_pdf(directory / "completion.tex")


def _compile_pdf(tex: Path) -> None:
    with tempfile.TemporaryDirectory() as build:
        result = subprocess.run(
            ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", f"-output-directory={build}",
             tex.name],
            cwd=tex.parent, check=False, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        pdf = Path(build) / tex.with_suffix(".pdf").name
        if result.returncode == 0 and pdf.exists():
            shutil.copy(pdf, tex.with_suffix(".pdf"))
        else:
            log.warning(
                "pdflatex could not typeset %s; kept the .tex only:\n%s", tex.name, result.stdout[-2000:]
            )


def log_metrics(tables: dict[str, pd.DataFrame]) -> None:
    """Headline numbers as metrics at each checkpoint's step, so the MLflow UI charts them over training."""
    series = {
        "usage/reasoning_share": tables["usage/usage.csv"].set_index(["run", "step"])["reasoning_share"],
        "entropy/thought_mean": tables["entropy/entropy.csv"].set_index(["run", "step"])["mean_entropy"],
    }
    drift = tables["drift/drift.csv"]
    for (matrix, measure), group in drift.groupby(["matrix", "measure"]):
        series[f"drift/{matrix}/{measure}_mean"] = group.set_index(["run", "step"])["mean"]
    for name, values in series.items():
        for (role, step), value in values.items():
            mlflow.log_metric(name if role == "training" else f"{role}/{name}", float(value), step=int(step))


# --- the job ------------------------------------------------------------------------------------------------
def _vocabulary(path: Path) -> tuple[PreTrainedTokenizerBase, ReasoningVocab]:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    vocab = ReasoningVocab.load(path, tokenizer)
    return make_faithful(tokenizer, vocab), vocab


def _check_comparable(training: ReasoningVocab, baseline: ReasoningVocab) -> None:
    sizes = (training.base_vocab_size, training.tokenizer_size)
    if sizes != (baseline.base_vocab_size, baseline.tokenizer_size):
        raise InputError(
            f"baseline_run's model has {baseline.base_vocab_size} rows and {baseline.tokenizer_size} token "
            f"ids, the training run's {training.base_vocab_size} and {training.tokenizer_size}; compare runs "
            "of one base model."
        )


def analyze(settings: AnalyzeSettings) -> str:
    """Measure the runs as `settings` say and log everything to a new `analyze` run; returns its id."""
    validate(settings)
    check_tracking_server()
    training = resolve_run(settings.training_run, "training_run", "training", settings.max_checkpoints)
    runs = [training]
    if settings.baseline_run.strip():
        runs.append(resolve_run(settings.baseline_run, "baseline_run", "baseline", settings.max_checkpoints))
    split = held_out(training, settings.data, settings.split)
    frame = split.frame.head(settings.max_prompts)
    tokenizer, vocab = _vocabulary(training.checkpoints[0][1])
    for other in runs[1:]:
        _check_comparable(vocab, _vocabulary(other.checkpoints[0][1])[1])
    families = token_families(settings.tokens, family_texts(frame, tokenizer, vocab), tokenizer, vocab)
    prompts = [as_messages(list(p)) for p in frame["prompt"]]
    plan = Plan(
        prompts=prompts,
        prompt_ids=[
            tokenizer.encode(
                tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False,
            )
            for p in prompts
        ],
        forced=teacher_forced(frame, tokenizer, settings.max_new_tokens),
        families=families,
        settings=settings,
        device="cuda" if torch.cuda.is_available() else None,
    )
    if not os.environ.get("MLFLOW_RUN_ID") and not experiment_in_environment():
        mlflow.set_experiment(experiment_id=training.run.info.experiment_id)  # analyses sit beside their run
    tags = {"rlvr.step": "analyze", "rlvr.training_run_id": training.run_id}
    if len(runs) > 1:
        tags["rlvr.baseline_run_id"] = runs[1].run_id
    with entrypoint_run("analyze", tags) as active, tempfile.TemporaryDirectory() as scratch:
        log_params(dataclasses.asdict(settings) | {
            "training_run_id": training.run_id,
            "training_output_dir": str(training.output_dir.resolve()),
            "baseline_run_id": runs[1].run_id if len(runs) > 1 else "",
            "baseline_output_dir": str(runs[1].output_dir.resolve()) if len(runs) > 1 else "",
            "steps": ",".join(str(step) for step, _ in training.checkpoints),
            "families": " ".join(f.label for f in families),
            "entropy_text": "references" if plan.forced else "samples",
            "data_digest": split.digest,
        })  # fmt: skip
        mlflow.log_input(split.mlflow_dataset(), context="analysis")
        out = Measurements()
        for run in runs:
            measure_run(run, plan, out)
        tables = write_outputs(out, runs, Path(scratch))
        log_metrics(tables)
        mlflow.log_artifacts(scratch)
        analysis_id = active.info.run_id
    client = MlflowClient()
    for run in runs:
        client.set_tag(run.run_id, TAG_PREFIX + analysis_id, f"runs:/{analysis_id}")
    return analysis_id
