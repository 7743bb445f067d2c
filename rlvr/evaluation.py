"""Evaluation: k constrained samples per held-out problem, scored by math-verify, logged to MLflow per
dataset.

`evaluate(settings)` is the whole job behind the `evaluate` entry point and what the `main` pipeline calls.
Each dataset (a preprocess output, or a raw source normalised on the fly exactly as preprocess would) gets
these metrics, logged as `eval/<label>/<metric>` and returned by `evaluate` under the data item as given:

- `accuracy`: the share of correct samples (pass@1 averaged over problems);
- `accuracy_ci_low`, `accuracy_ci_high`: its 95% Wilson score interval over problems (see `wilson_interval`);
- `lenient_accuracy` (with `_ci_low`, `_ci_high`): the share of samples whose answer is right by its final
  number, boxed or not (`rewards.lenient_is_correct`), for models that answer without `\\boxed{}`;
- `pass_at_1` and `pass_at_<k>` for k = num_samples: the unbiased pass@k estimate averaged over problems;
- `format_rate`: the share of well-formed samples (one closed thought, then one boxed answer);
- `thought_length`, `answer_length`: mean tokens per sample inside and after the thought;
- `reasoning_share`: reasoning tokens among all thought tokens (0 for a baseline);
- `problems`: how many problems were evaluated.

The run points at the model it evaluated: tags name the source (and, for registry URIs, the version and the
training run), the metrics are linked to the MLflow LoggedModel so its page lists them, and a registered
version gets a tag naming this run. A samples table and an HTML page with reasoning tokens coloured are its
artifacts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.data.pandas_dataset import PandasDataset
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlvr import tracking
from rlvr.dataset import DATA_ARTIFACT_PATH, Split, load_split
from rlvr.errors import InputError, check_sampling, flag, require_at_least_one
from rlvr.generation import Generated, as_messages, generate
from rlvr.guards import require_finite_weights
from rlvr.gym_source import PREFIX as REASONING_GYM
from rlvr.models import load_model
from rlvr.preprocess import SYNTHETIC, Options, preprocess
from rlvr.rendering import PageEntry, completions_page, marked_text
from rlvr.rewards import DEFAULT_INSTRUCTION, answer_is_correct, lenient_is_correct
from rlvr.settings import bf16_enabled, param

log = logging.getLogger(__name__)

METRIC_PREFIX = "eval"
SAMPLES_TABLE = "samples.json"
SAMPLES_PAGE = "samples.html"
VERSION_TAG_PREFIX = "rlvr.eval."  # + run id: the registry's record of each evaluation of a version
Z_95 = 1.959963984540054

# sources whose options follow them after commas, and what one such option looks like
_SOURCES_WITH_OPTIONS = (SYNTHETIC + ":", REASONING_GYM + ":")
_SOURCE_OPTION = re.compile(r"^[\w.]+=[^/]*$")
_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))/?$")


@dataclass
class EvalSettings:
    """Every parameter of the evaluate entry point, with its one default."""

    model: str = param(
        "Qwen/Qwen3-0.6B",
        "MLflow model URI (runs:/, models:/name@alias, models:/name/N), local "
        "directory, preset (micro, tiny-qwen3, ...) or hub id",
    )
    data: str = param(
        "outputs/data",
        "comma-separated datasets: preprocess outputs (output_dir or runs:/ URI) or "
        "sources (hub id, local file, synthetic[:options], reasoning_gym:...) normalised as preprocess does",
    )
    split: str = param(
        "test", "split to evaluate: of a preprocess output (train or test), or of a hub dataset"
    )
    num_samples: int = param(4, "completions sampled per problem: the k of pass@k")
    temperature: float = param(0.6, "sampling temperature (0: greedy, which needs num_samples=1)")
    top_p: float = param(0.95, "nucleus sampling: sample from the smallest set of tokens with this much mass")
    max_new_tokens: int = param(1024, "tokens sampled per completion at most")
    batch_size: int = param(16, "sequences generated together")
    seed: int = param(0, "seed of the sampling and of the shuffle of a raw source")
    max_examples: int = param(0, "evaluate the first this many problems of each dataset (0: all)")
    system_prompt: str = param("", "system message put before each problem of a raw source (none if empty)")
    instruction: str = param(
        DEFAULT_INSTRUCTION, "appended to each problem of a raw source, as preprocess does"
    )
    bf16: str = param("auto", "load the model in bf16: true, false or auto (on when a GPU supports it)")


@dataclass(frozen=True)
class EvalSet:
    """One dataset under evaluation: `key` is the data item as given (the key of `evaluate`'s result), `label`
    its name in metric keys, `dataset` its identity in MLflow (logged as input, linked to every metric)."""

    key: str
    label: str
    split: Split
    dataset: PandasDataset
    max_examples: int

    @property
    def problems(self) -> pd.DataFrame:
        frame = self.split.frame
        return frame.head(self.max_examples) if self.max_examples else frame


@dataclass(frozen=True)
class Scored:
    """One completion with its verdicts: strict (`correct`, the boxed answer) and lenient (its final
    number)."""

    generated: Generated
    correct: bool
    well_formed: bool
    lenient: bool


@dataclass(frozen=True)
class ModelLink:
    """How the evaluation run points at its model: run tags, the LoggedModel its metrics attach to (if any),
    and the registered version that records the evaluation (if any)."""

    tags: dict[str, str]
    model_id: str | None
    version: ModelVersion | None


# --- settings and data --------------------------------------------------------------------------------------
def validate(settings: EvalSettings) -> None:
    """Checks that need no model or data, so a bad request fails in seconds."""
    if settings.num_samples < 1:
        raise InputError(f"num_samples={settings.num_samples} must be at least 1: it is the k of pass@k.")
    check_sampling(settings.temperature, settings.num_samples)
    if not 0 < settings.top_p <= 1:
        raise InputError(
            f"top_p={settings.top_p} is not in (0, 1]; pass e.g. 0.95, or 1 to turn nucleus sampling off."
        )
    require_at_least_one(settings, "max_new_tokens", "batch_size")
    if settings.max_examples < 0:
        raise InputError(
            f"max_examples={settings.max_examples} is negative; pass 0 to evaluate every problem."
        )
    flag("bf16", settings.bf16)


def data_items(data: str) -> list[str]:
    """The comma-separated datasets of `data`; a synthetic or reasoning-gym source keeps its own
    comma-separated options."""
    items: list[str] = []
    for piece in (p.strip() for p in data.split(",")):
        if items and items[-1].startswith(_SOURCES_WITH_OPTIONS) and _SOURCE_OPTION.match(piece):
            items[-1] += f",{piece}"
        elif piece:
            items.append(piece)
    if not items:
        raise InputError(
            "data is empty; pass a preprocess output_dir, its runs:/ URI or a source, comma-separated for "
            "several."
        )
    repeated = [item for item, count in Counter(items).items() if count > 1]
    if repeated:
        raise InputError(f"data lists {repeated[0]!r} more than once; name each dataset once.")
    return items


def is_preprocess_output(item: str) -> bool:
    """A directory or URI holds preprocess output; anything else (hub id, file, synthetic, reasoning_gym) is a
    raw source. A generated source is not looked up as a path: its options can be longer than a file name."""
    if item.startswith(_SOURCES_WITH_OPTIONS):
        return False
    return tracking.is_mlflow_uri(item) or Path(item).expanduser().is_dir()


def metric_label(split: Split) -> str:
    """A dataset's name as one segment of a metric key: no split, no hub owner, other characters as `_`."""
    name = split.name.removesuffix(f"/{split.split}").rsplit("/", 1)[-1]
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "data"


def metric_key(label: str, name: str) -> str:
    """The key under which an evaluation logs metric `name` of the dataset labelled `label`."""
    return f"{METRIC_PREFIX}/{label}/{name}"


def metrics_by_label(logged: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """An evaluation run's logged metrics read back per dataset label: `metric_key`'s inverse."""
    found: dict[str, dict[str, float]] = {}
    for key, value in logged.items():
        prefix, _, rest = key.partition("/")
        label, _, name = rest.rpartition("/")
        if prefix == METRIC_PREFIX and label:
            found.setdefault(label, {})[name] = value
    return found


def _unique(label: str, taken: set[str]) -> str:
    candidates = (label if n == 1 else f"{label}_{n}" for n in range(1, len(taken) + 2))
    return next(c for c in candidates if c not in taken)


def _load_item(item: str, settings: EvalSettings, scratch: Path) -> Split:
    if is_preprocess_output(item):
        return load_split(
            item, settings.split
        )  # same name and digest as preprocess logged: the UI links them
    options = Options(
        split=settings.split,
        test_size=0,
        seed=settings.seed,
        system_prompt=settings.system_prompt,
        instruction=settings.instruction,
    )
    try:
        preprocess(item, scratch, options)
    except InputError as error:
        raise InputError(
            f"data {item!r} is no preprocess output (a directory or runs:/ URI), and as a source it failed: "
            f"{error}"
        ) from error
    split = load_split(str(scratch), "train")  # test_size 0: every usable row is in `train`
    return dataclasses.replace(split, name=split.name.removesuffix("/train"))  # not a split of anything


def _keep_in_run(split: Split, label: str) -> Split:
    """Store a normalised raw source in the run, so its dataset input points at the rows that were
    evaluated."""
    path = split.path.rename(split.path.with_name(f"{label}.parquet"))
    mlflow.log_artifact(str(path), DATA_ARTIFACT_PATH)
    run_id = mlflow.active_run().info.run_id
    return dataclasses.replace(
        split, path=path, source_uri=f"runs:/{run_id}/{DATA_ARTIFACT_PATH}/{path.name}"
    )


def load_eval_sets(items: Sequence[str], settings: EvalSettings, scratch: Path) -> list[EvalSet]:
    """Every data item read (or normalised), labelled uniquely and logged as an input of the active run."""
    sets: list[EvalSet] = []
    for index, item in enumerate(items):
        split = _load_item(item, settings, scratch / str(index)).require_rows(item)
        label = _unique(metric_label(split), {s.label for s in sets})
        if not is_preprocess_output(item):
            split = _keep_in_run(split, label)
        dataset = split.mlflow_dataset()
        mlflow.log_input(dataset, context="eval")
        sets.append(EvalSet(item, label, split, dataset, settings.max_examples))
    return sets


# --- scoring ------------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of the chance that at least one of k samples is correct, from c correct among n >= k.

    1 - C(n-c, k) / C(n, k), written as a product of ratios so that no binomial coefficient is formed: large n
    neither overflows nor loses precision.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def wilson_interval(mean: float, count: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for the mean of `count` independent values in [0, 1] (95% by default).

    The independent units are problems, not samples: samples of one problem are correlated. With k = 1 this is
    the classic Wilson interval of a proportion. With k > 1 each problem contributes its share of correct
    samples; any value in [0, 1] with mean p has variance at most p(1 - p), so using that bound keeps the
    interval valid (conservative) whatever the correlation. Unlike a normal or bootstrap interval it does not
    collapse to a point at accuracy 0 or 1.
    """
    spread = z * z / count
    centre = (mean + spread / 2) / (1 + spread)
    half = z / (1 + spread) * math.sqrt(mean * (1 - mean) / count + spread / (4 * count))
    return max(0.0, centre - half), min(1.0, centre + half)


def sample_and_score(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: pd.DataFrame, settings: EvalSettings
) -> list[list[Scored]]:
    """`num_samples` constrained completions per problem, each judged by math-verify (strictly and leniently)
    and the format check."""
    generated = generate(
        model, tokenizer, [list(p) for p in problems["prompt"]], max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature, top_p=settings.top_p, num_samples=settings.num_samples,
        batch_size=settings.batch_size, seed=settings.seed,
    )  # fmt: skip
    return [
        [_scored(g, solution) for g in samples]
        for samples, solution in zip(generated, problems["solution"], strict=True)
    ]


def _scored(generated: Generated, solution: str) -> Scored:
    answer = generated.answer
    return Scored(
        generated,
        answer_is_correct(answer, solution),
        generated.well_formed,
        lenient_is_correct(answer, solution),
    )


def dataset_metrics(scored: Sequence[Sequence[Scored]]) -> dict[str, float]:
    """The metrics of one dataset (see the module docstring) from its problems' scored samples."""
    k = len(scored[0])
    flat = [s for samples in scored for s in samples]
    correct = [sum(s.correct for s in samples) for samples in scored]
    accuracy = sum(correct) / len(flat)
    low, high = wilson_interval(accuracy, len(scored))
    lenient = sum(s.lenient for s in flat) / len(flat)
    lenient_low, lenient_high = wilson_interval(lenient, len(scored))
    thought = sum(s.generated.thought_tokens for s in flat)
    metrics = {
        "problems": float(len(scored)),
        "accuracy": accuracy,
        "accuracy_ci_low": low,
        "accuracy_ci_high": high,
        "lenient_accuracy": lenient,
        "lenient_accuracy_ci_low": lenient_low,
        "lenient_accuracy_ci_high": lenient_high,
    }
    for j in sorted({1, k}):
        metrics[f"pass_at_{j}"] = sum(pass_at_k(k, c, j) for c in correct) / len(scored)
    return metrics | {
        "format_rate": sum(s.well_formed for s in flat) / len(flat),
        "thought_length": thought / len(flat),
        "answer_length": sum(s.generated.answer_tokens for s in flat) / len(flat),
        "reasoning_share": sum(s.generated.reasoning_tokens for s in flat) / thought if thought else 0.0,
    }


# --- the model and its link ---------------------------------------------------------------------------------
def load_for_evaluation(settings: EvalSettings) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    dtype = torch.bfloat16 if bf16_enabled(settings.bf16) else torch.float32
    device = "cuda" if torch.cuda.is_available() else None
    model, tokenizer = load_model(settings.model, dtype=dtype, device=device)
    require_finite_weights(model, settings.model)
    return model.eval(), tokenizer


def check_prompt_lengths(
    eval_set: EvalSet, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Refuse a problem longer than the model's context, naming it: it cannot be answered, and a megabyte-long
    one would keep attention busy for hours before failing."""
    context = getattr(model.config, "max_position_embeddings", None)
    if not context:
        return
    problems = eval_set.problems
    texts = [
        tokenizer.apply_chat_template(as_messages(list(p)), tokenize=False, add_generation_prompt=True)
        for p in problems["prompt"]
    ]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] > context:
        raise InputError(
            f"data {eval_set.key!r}: problem {problems['id'].iloc[longest]!r} is a prompt of "
            f"{lengths[longest]} tokens, more than the {context} the model reads (max_position_embeddings); "
            "drop it from the data, or evaluate a model with a longer context."
        )


def registered_version(source: str) -> ModelVersion | None:
    """The registry version behind `models:/name@alias`, `models:/name/<N>` or `models:/name/latest`."""
    match = _REGISTERED.match(source)
    if match is None:
        return None
    client = MlflowClient()
    if match["alias"]:
        return client.get_model_version_by_alias(match["name"], match["alias"])
    if match["version"].isdigit():
        return client.get_model_version(match["name"], match["version"])
    if match["version"].lower() == "latest":
        return max(client.search_model_versions(f"name='{match['name']}'"), key=lambda v: int(v.version))
    return None  # a stage name: linked through the logged model only


def logged_model_id(source: str) -> str | None:
    """The MLflow LoggedModel behind an MLflow URI; None for presets, directories and hub ids."""
    if not tracking.is_mlflow_uri(source):
        return None
    try:
        return mlflow.models.get_model_info(source).model_id
    except MlflowException:
        return None  # a plain Hugging Face directory logged as artifacts has no MLmodel


def link_model(source: str) -> ModelLink:
    """Everything MLflow knows about `source` that lets a reader go from the evaluation to the model and
    back."""
    version = registered_version(source)
    tags = {"rlvr.model": source}
    if version is not None:
        tags |= {"rlvr.model_name": version.name, "rlvr.model_version": str(version.version)}
        if version.run_id:
            tags["rlvr.model_run_id"] = version.run_id
    elif source.startswith("runs:/"):
        tags["rlvr.model_run_id"] = source.removeprefix("runs:/").split("/", 1)[0]
    return ModelLink(tags, logged_model_id(source), version)


def record_on_version(version: ModelVersion, run_id: str, results: dict[str, dict[str, float]]) -> None:
    """Tag the registered version with this run, so the registry lists the evaluations of each version."""
    summary = "; ".join(f"{label}: accuracy {m['accuracy']:.4g}" for label, m in results.items())
    MlflowClient().set_model_version_tag(
        version.name, version.version, f"{VERSION_TAG_PREFIX}{run_id}", summary
    )


# --- artifacts ----------------------------------------------------------------------------------------------
def _problem_text(messages) -> str:
    return next(m["content"] for m in reversed(list(messages)) if m["role"] == "user")


def _samples(evaluated: Sequence[tuple[EvalSet, list[list[Scored]]]]):
    for eval_set, scored in evaluated:
        for row, samples in zip(eval_set.problems.itertuples(), scored, strict=True):
            for index, sample in enumerate(samples):
                yield eval_set.label, row, index, sample


def samples_table(evaluated: Sequence[tuple[EvalSet, list[list[Scored]]]]) -> pd.DataFrame:
    """One row per completion, reasoning tokens marked ⟦...⟧ as in the training samples tables."""
    return pd.DataFrame(
        [
            {
                "dataset": label,
                "id": row.id,
                "sample": index,
                "prompt": _problem_text(row.prompt),
                "solution": row.solution,
                "completion": marked_text(s.generated.text, s.generated.spans),
                "correct": s.correct,
                "lenient_correct": s.lenient,
                "well_formed": s.well_formed,
                "thought_tokens": s.generated.thought_tokens,
                "reasoning_tokens": s.generated.reasoning_tokens,
                "answer_tokens": s.generated.answer_tokens,
            }
            for label, row, index, s in _samples(evaluated)
        ]
    )


def samples_page(model: str, evaluated: Sequence[tuple[EvalSet, list[list[Scored]]]]) -> str:
    entries = [
        PageEntry(
            f"{label} · {row.id} · sample {index}",
            _problem_text(row.prompt),
            row.solution,
            s.correct,
            s.generated.text,
            s.generated.spans,
        )
        for label, row, index, s in _samples(evaluated)
    ]
    return completions_page(f"Evaluation of {model}", entries)


# --- the job ------------------------------------------------------------------------------------------------
def evaluate(settings: EvalSettings) -> dict[str, dict[str, float]]:
    """Evaluate `settings.model` on every dataset of `settings.data` in one MLflow run.

    Returns each data item's metrics (names as in the module docstring, without the `eval/<label>/` prefix),
    in the order given.
    """
    validate(settings)
    items = data_items(settings.data)
    with (
        tracking.entrypoint_run("evaluate", {"rlvr.step": "evaluate"}) as run,
        tempfile.TemporaryDirectory() as scratch,
    ):
        tracking.log_params(dataclasses.asdict(settings))
        sets = load_eval_sets(items, settings, Path(scratch))
        model, tokenizer = load_for_evaluation(settings)
        for eval_set in sets:
            check_prompt_lengths(eval_set, model, tokenizer)
        link = link_model(settings.model)
        mlflow.set_tags(link.tags)
        tracking.log_params({"reasoning_vocab_size": model.reasoning_vocab.size})
        results: dict[str, dict[str, float]] = {}
        evaluated = []
        for eval_set in sets:
            log.info(
                "evaluating %s on %d problems of %s", settings.model, len(eval_set.problems), eval_set.key
            )
            scored = sample_and_score(model, tokenizer, eval_set.problems, settings)
            metrics = dataset_metrics(scored)
            prefixed = {metric_key(eval_set.label, name): value for name, value in metrics.items()}
            mlflow.log_metrics(prefixed, model_id=link.model_id, dataset=eval_set.dataset)
            results[eval_set.key] = metrics
            evaluated.append((eval_set, scored))
        mlflow.log_table(samples_table(evaluated), artifact_file=SAMPLES_TABLE)
        mlflow.log_text(samples_page(settings.model, evaluated), SAMPLES_PAGE)
        if link.version is not None:
            record_on_version(link.version, run.info.run_id, {s.label: results[s.key] for s in sets})
    return results
