"""Evaluation: n constrained samples per held-out problem, scored by math-verify, reported as the protocols
papers use and logged to MLflow per benchmark.

`evaluate(settings)` is the whole job behind the `evaluate` entry point and what the `main` pipeline runs.
Each dataset (a preprocess output, or a raw source normalised on the fly exactly as preprocess would) is a
benchmark with a short label (`math500`, `aime24`, a file's stem, `synthetic`) and gets, as
`eval/<label>/<metric>` (`rlvr.protocols` defines the estimators; intervals are 95% over problems):

- `accuracy`, `accuracy_ci_low`, `accuracy_ci_high`: avg@n, the share of correct samples;
- `lenient_accuracy` (with `_ci_low`, `_ci_high`): the share of samples whose answer is right by its final
  number, boxed or not (`rewards.lenient_is_correct`), for models that answer without `\\boxed{}`;
- `pass_at_<k>` and `maj_at_<k>` (each with `_ci_low`, `_ci_high`) for k = 1, 2, 4, ... up to n, or the
  `k_values` asked for: unbiased pass@k, and majority vote over k answers grouped by math-verify;
- `format_rate` (one closed thought, then one boxed answer), `truncation_rate` (samples that ran out of
  tokens before their stop token), `thought_length` and `answer_length` (mean tokens per sample, as
  `rlvr.thoughts` splits them), `reasoning_share` (reasoning tokens among thought tokens), `problems` and
  `samples` (n).

Sampling goes through the fast constrained decoder (`rlvr.rollout`) by default where it is faster, else
through `generate`. Several models (`model=a,b`) are scored on the same problems with the same random numbers,
each in a child run of the evaluation's run, which logs their paired differences (`rlvr.statistics`) as
`compare/<label>/<b>_vs_<a>` (B minus A, with `_ci_low`, `_ci_high`, `_p_value`) for each model against the
first. Under `accelerate launch` every process samples a share of the problems and the main process gathers
them and logs one run, as one process would.

A run points at the model it evaluated: tags name the source (and, for registry URIs, the version and the
training run), the metrics are linked to the MLflow LoggedModel so its page lists them, and a registered
version gets a tag naming the run. Its artifacts: a samples table, an HTML page with reasoning tokens
coloured, and accuracy by thought length (a figure and its table). `time/<phase>_s` says where one model's
evaluation spent its seconds: `load` (weights from disk), `prepare` (the decoding copy), `sampling`,
`scoring_tail` (the problems still being scored when sampling ended), `logging` (metrics and artifacts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
import torch
from accelerate.utils import gather_object
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter
from mlflow.data.pandas_dataset import PandasDataset
from mlflow.entities.model_registry import ModelVersion
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlvr import protocols, statistics, thoughts
from rlvr.dataset import DATA_ARTIFACT_PATH, Split, load_split
from rlvr.errors import InputError, flag, require_at_least_one
from rlvr.generation import Generated, describe_all, prompt_ids, sample
from rlvr.guards import require_finite_weights
from rlvr.gym_source import PREFIX as REASONING_GYM
from rlvr.job import end_with_launcher, process_state
from rlvr.models import load_model, locate_model
from rlvr.preprocess import SYNTHETIC, Options, preprocess
from rlvr.progress import Progress
from rlvr.rendering import PageEntry, completions_page, marked_text
from rlvr.rewards import DEFAULT_INSTRUCTION, answer_groups, answer_is_correct, lenient_is_correct
from rlvr.rollout import FastRollout, LoopTimes, Sampled
from rlvr.sampling import Sampling
from rlvr.settings import bf16_enabled, param
from rlvr.tracking import registry
from rlvr.tracking.params import log_params
from rlvr.tracking.runs import entrypoint_run
from rlvr.tracking.uris import is_mlflow_uri, run_id_of

log = logging.getLogger(__name__)

METRIC_PREFIX = "eval"
COMPARE_PREFIX = "compare"
LOOP_PREFIX = "decode"  # where the fast decoder's host time went (`LoopTimes`)
TIME_PREFIX = "time"  # the seconds of one model's evaluation by phase (`Phases`)
# score finished problems on a thread of their own: None, when sampling on an accelerator (on a CPU the eager
# decode steps need the interpreter themselves, so a thread only contends with them; BENCHMARKS.md)
SCORING_THREAD: bool | None = None
SAMPLES_TABLE = "samples.json"
SAMPLES_PAGE = "samples.html"
COMPARISON_TABLE = "comparison.md"
LENGTHS_FIGURE = "lengths/accuracy_by_thought_length.png"
LENGTHS_TABLE = "lengths/accuracy_by_thought_length.csv"
VERSION_TAG_PREFIX = "rlvr.eval."  # + run id: the registry's record of each evaluation of a version
# Fast decoding on a CPU: eager, and measured against `generate` on the demo's evaluation (BENCHMARKS.md)
FAST_ON_CPU = True
_LENGTH_BIN_START = 16  # thought-length bins: [0, 16), [16, 32), [32, 64), ... doubling up to the budget

# sources whose options follow them after commas, and what one such option looks like
_SOURCES_WITH_OPTIONS = (SYNTHETIC + ":", REASONING_GYM + ":")
_SOURCE_OPTION = re.compile(r"^[\w.]+=[^/]*$")
_CONTEST_YEAR = re.compile(r"(aime|amc|hmmt)[_-]?(?:20)?(\d{2})(?!\d)")
_FILE_SUFFIX = re.compile(r"\.(jsonl|json|parquet|csv)$")


@dataclass
class EvalSettings:
    """Every parameter of the evaluate entry point, with its one default."""

    model: str = param(
        "Qwen/Qwen3-0.6B",
        "MLflow model URI (runs:/, models:/name@alias, models:/name/N), local directory, preset (micro, "
        "tiny-qwen3, ...) or hub id; comma-separated for several, scored on the same problems and samples "
        "and compared with the first",
    )
    data: str = param(
        "outputs/data",
        "comma-separated datasets: preprocess outputs (output_dir or runs:/ URI) or "
        "sources (hub id, local file, synthetic[:options], reasoning_gym:...) normalised as preprocess does",
    )
    split: str = param(
        "test",
        "split to evaluate: of a preprocess output (train or test), or of a hub dataset; comma-separated, "
        "one per dataset, to choose each",
    )
    num_samples: int = param(4, "completions sampled per problem: the n of avg@n, pass@k and maj@k")
    k_values: str = param(
        "", "k of pass@k and maj@k, comma-separated (empty: 1, 2, 4, ... up to num_samples)"
    )
    temperature: float = param(0.6, "sampling temperature (0: greedy, which needs num_samples=1)")
    top_p: float = param(0.95, "nucleus sampling: sample from the smallest set of tokens with this much mass")
    top_k: int = param(0, "sample from the k most likely tokens only (0: all)")
    max_new_tokens: int = param(1024, "tokens sampled per completion at most")
    batch_size: str = param(
        "auto", "sequences decoded together, or auto: as many as accelerator memory holds"
    )
    fast_decoding: str = param(
        "auto",
        "sample with rlvr's compiled decoder (true), Hugging Face generate (false), or auto (the faster)",
    )
    seed: int = param(0, "seed of the sampling and of the shuffle of a raw source")
    max_examples: int = param(0, "evaluate the first this many problems of each dataset (0: all)")
    system_prompt: str = param("", "system message put before each problem of a raw source (none if empty)")
    instruction: str = param(
        DEFAULT_INSTRUCTION, "appended to each problem of a raw source, as preprocess does"
    )
    bf16: str = param("auto", "load the model in bf16: true, false or auto (on when a GPU supports it)")

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, top_p=self.top_p, top_k=self.top_k)


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
    """One completion with its verdicts: strict (`correct`, the boxed answer) and `lenient` (its final
    number); `vote` is its answer group for majority voting (None: no answer)."""

    generated: Generated
    correct: bool
    well_formed: bool
    truncated: bool = False
    vote: int | None = None
    lenient: bool = False


@dataclass(frozen=True)
class ProblemScores:
    """A problem's scored samples, and the answer group that is right (None: no sample has it)."""

    samples: list[Scored]
    right: int | None


@dataclass(frozen=True)
class ModelLink:
    """How the evaluation run points at its model: run tags, the LoggedModel its metrics attach to (if any),
    and the registered version that records the evaluation (if any)."""

    tags: dict[str, str]
    model_id: str | None
    version: ModelVersion | None


@dataclass(frozen=True)
class ModelResult:
    """One model's metrics per data item and its per-problem accuracy per data item (indexed by problem id),
    which the paired comparison reads."""

    metrics: dict[str, dict[str, float]]
    per_problem: dict[str, pd.Series]


@dataclass
class Evaluation:
    """What `evaluate` returns (in the main process): per model as named, per data item as given, its
    metrics; per data item, each later model's paired comparison with the first; and the run's id."""

    run_id: str
    metrics: dict[str, dict[str, dict[str, float]]]
    comparisons: dict[str, dict[str, statistics.Paired]] = field(default_factory=dict)


# --- settings and data --------------------------------------------------------------------------------------
def validate(settings: EvalSettings) -> None:
    """Checks that need no model or data, so a bad request fails in seconds."""
    if settings.num_samples < 1:
        raise InputError(f"num_samples={settings.num_samples} must be at least 1: it is the n of avg@n.")
    settings.sampling.check(settings.num_samples)
    require_at_least_one(settings, "max_new_tokens")
    batch_size(settings)
    k_values(settings)
    if settings.max_examples < 0:
        raise InputError(
            f"max_examples={settings.max_examples} is negative; pass 0 to evaluate every problem."
        )
    flag("bf16", settings.bf16)
    flag("fast_decoding", settings.fast_decoding)
    model_items(settings.model)
    splits_for(settings.split, data_items(settings.data))


def batch_size(settings: EvalSettings) -> int | None:
    """The batch size asked for; None for auto."""
    text = str(settings.batch_size).strip().lower()
    if text == "auto":
        return None
    if not text.lstrip("-").isdigit():
        raise InputError(
            f"batch_size={settings.batch_size!r} is neither auto nor a whole number; pass e.g. 64."
        )
    if int(text) < 1:
        raise InputError(f"batch_size={text} must be at least 1 (or auto).")
    return int(text)


def k_values(settings: EvalSettings) -> list[int]:
    """The k of pass@k and maj@k: those asked for, or 1, 2, 4, ... up to num_samples."""
    if not settings.k_values.strip():
        return protocols.ladder(settings.num_samples)
    try:
        ks = sorted({int(k) for k in settings.k_values.replace(" ", "").split(",") if k})
    except ValueError:
        raise InputError(
            f"k_values={settings.k_values!r} is not a comma-separated list of whole numbers."
        ) from None
    for k in ks:
        if not 1 <= k <= settings.num_samples:
            raise InputError(
                f"k_values asks for k={k}, but pass@k and maj@k need 1 <= k <= num_samples="
                f"{settings.num_samples}; sample more per problem or ask for a smaller k."
            )
    return ks


def model_items(model: str) -> list[str]:
    """The comma-separated models of `model`, each named once."""
    items = [piece.strip() for piece in model.split(",") if piece.strip()]
    if not items:
        raise InputError("model is empty; pass a model (an MLflow URI, directory, preset or hub id).")
    repeated = [item for item, count in Counter(items).items() if count > 1]
    if repeated:
        raise InputError(f"model lists {repeated[0]!r} more than once; name each model once.")
    return items


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


def splits_for(split: str, items: Sequence[str]) -> list[str]:
    """The split of each data item: one for all, or one per item."""
    splits = [piece.strip() for piece in split.split(",")]
    if len(splits) == 1:
        return splits * len(items)
    if len(splits) != len(items) or not all(splits):
        raise InputError(
            f"split={split!r} names {len(splits)} splits for {len(items)} datasets; pass one split for all, "
            "or one per dataset in the order of data."
        )
    return splits


def is_preprocess_output(item: str) -> bool:
    """A directory or URI holds preprocess output; anything else (hub id, file, synthetic, reasoning_gym) is a
    raw source. A generated source is not looked up as a path: its options can be longer than a file name."""
    if item.startswith(_SOURCES_WITH_OPTIONS):
        return False
    return is_mlflow_uri(item) or Path(item).expanduser().is_dir()


def metric_label(split: Split) -> str:
    """A benchmark's short name, one segment of a metric key: the dataset's name without split, hub owner,
    file suffix or source options, lower case, with years of contests shortened (`HuggingFaceH4/MATH-500`:
    `math500`, `aime_2024`: `aime24`, `sevens.jsonl`: `sevens`, any synthetic source: `synthetic`)."""
    name = split.name.removesuffix(f"/{split.split}")
    if name.split(":", 1)[0] == SYNTHETIC:
        return SYNTHETIC
    name = _FILE_SUFFIX.sub("", name.rsplit("/", 1)[-1].lower()).replace("-", "")
    name = _CONTEST_YEAR.sub(r"\1\2", name)
    return re.sub(r"[^\w.]+", "_", name).strip("_") or "data"


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


def model_label(source: str) -> str:
    """A model's name in comparison keys: its source with the URI scheme dropped, other characters as `_`."""
    return re.sub(r"[^\w.-]+", "_", source.split(":/", 1)[-1]).strip("_") or "model"


def _unique(label: str, taken: set[str]) -> str:
    candidates = (label if n == 1 else f"{label}_{n}" for n in range(1, len(taken) + 2))
    return next(c for c in candidates if c not in taken)


def _load_item(item: str, split: str, settings: EvalSettings, scratch: Path) -> Split:
    if is_preprocess_output(item):
        return load_split(item, split)  # same name and digest as preprocess logged: the UI links them
    options = Options(
        split=split,
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
    loaded = load_split(str(scratch), "train")  # test_size 0: every usable row is in `train`
    return dataclasses.replace(loaded, name=loaded.name.removesuffix("/train"))  # not a split of anything


def _keep_in_run(split: Split, label: str) -> Split:
    """Store a normalised raw source in the run, so its dataset input points at the rows that were
    evaluated."""
    path = split.path.rename(split.path.with_name(f"{label}.parquet"))
    mlflow.log_artifact(str(path), DATA_ARTIFACT_PATH)
    run_id = mlflow.active_run().info.run_id
    return dataclasses.replace(
        split, path=path, source_uri=f"runs:/{run_id}/{DATA_ARTIFACT_PATH}/{path.name}"
    )


def load_eval_sets(
    items: Sequence[str], splits: Sequence[str], settings: EvalSettings, scratch: Path, logged: bool = True
) -> list[EvalSet]:
    """Every data item read (or normalised) and labelled uniquely; with `logged`, logged as an input of the
    active run (a normalised raw source stored in it)."""
    sets: list[EvalSet] = []
    for index, (item, split) in enumerate(zip(items, splits, strict=True)):
        loaded = _load_item(item, split, settings, scratch / str(index)).require_rows(item)
        label = _unique(metric_label(loaded), {s.label for s in sets})
        if logged and not is_preprocess_output(item):
            loaded = _keep_in_run(loaded, label)
        dataset = loaded.mlflow_dataset()
        if logged:
            mlflow.log_input(dataset, context="eval")
        sets.append(EvalSet(item, label, loaded, dataset, settings.max_examples))
    return sets


# --- scoring ------------------------------------------------------------------------------------------------
def score_problem(generated: Sequence[Generated], truncated: Sequence[bool], solution: str) -> ProblemScores:
    """A problem's samples judged by math-verify and the format check, with their answers grouped for
    voting (each answer and the solution read once, at a bounded cost)."""
    correct = [answer_is_correct(g.answer, solution) for g in generated]
    votes, right = answer_groups([g.answer for g in generated], correct)
    samples = [
        Scored(g, c, g.well_formed, t, v, c or lenient_is_correct(g.answer, solution))
        for g, c, t, v in zip(generated, correct, truncated, votes, strict=True)
    ]
    return ProblemScores(samples, right)


def dataset_metrics(problems: Sequence[ProblemScores], ks: Sequence[int]) -> dict[str, float]:
    """The metrics of one benchmark (see the module docstring) from its problems' scored samples."""
    n = len(problems[0].samples)
    flat = [s for p in problems for s in p.samples]
    correct = [sum(s.correct for s in p.samples) for p in problems]
    counted = thoughts.Counts.of(s.generated.structure for s in flat)
    metrics = {"problems": float(len(problems)), "samples": float(n)}
    metrics |= protocols.with_interval("accuracy", [c / n for c in correct])
    lenient = [sum(s.lenient for s in p.samples) / n for p in problems]
    metrics |= protocols.with_interval("lenient_accuracy", lenient)
    for k in ks:
        metrics |= protocols.with_interval(f"pass_at_{k}", [protocols.pass_at_k(n, c, k) for c in correct])
    for k in ks:
        values = [protocols.majority_at_k([s.vote for s in p.samples], p.right, k) for p in problems]
        metrics |= protocols.with_interval(f"maj_at_{k}", values)
    return metrics | {
        "format_rate": sum(s.well_formed for s in flat) / len(flat),
        "truncation_rate": sum(s.truncated for s in flat) / len(flat),
        "thought_length": counted.thought_length,
        "answer_length": counted.answer_length,
        "reasoning_share": counted.reasoning_share,
    }


def length_bins(max_new_tokens: int) -> list[int]:
    """Edges of the thought-length bins: 0, 16, 32, 64, ... below the token budget, then the budget + 1."""
    edges, edge = [0], _LENGTH_BIN_START
    while edge < max_new_tokens:
        edges.append(edge)
        edge *= 2
    return [*edges, max_new_tokens + 1]


def accuracy_by_thought_length(
    evaluated: Sequence[tuple[EvalSet, list[ProblemScores]]], max_new_tokens: int
) -> pd.DataFrame:
    """Per benchmark and thought-length bin: the samples in it and their accuracy (NaN where none)."""
    edges = length_bins(max_new_tokens)
    rows = []
    for eval_set, problems in evaluated:
        lengths = pd.Series([s.generated.thought_tokens for p in problems for s in p.samples])
        correct = pd.Series([s.correct for p in problems for s in p.samples], dtype=float)
        bins = pd.cut(lengths, edges, right=False, labels=False)
        for index, (low, high) in enumerate(zip(edges, edges[1:], strict=False)):
            inside = correct[bins == index]
            rows.append(
                {
                    "dataset": eval_set.label,
                    "thought_tokens_from": low,
                    "thought_tokens_to": high - 1,
                    "samples": int(inside.size),
                    "accuracy": float(inside.mean()) if inside.size else math.nan,
                }
            )
    return pd.DataFrame(rows)


def length_figure(table: pd.DataFrame, title: str, path: Path) -> None:
    """Accuracy per thought-length bin, one line per benchmark; a point's area shows its share of samples."""
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    for label, rows in table.groupby("dataset", sort=False):
        names = [
            f"{a}-{b}" for a, b in zip(rows["thought_tokens_from"], rows["thought_tokens_to"], strict=True)
        ]
        share = rows["samples"] / max(1, rows["samples"].sum())
        line = axes.plot(names, rows["accuracy"], label=label)[0]
        axes.scatter(names, rows["accuracy"], s=20 + 400 * share, color=line.get_color(), alpha=0.6)
    axes.set_xlabel("thought tokens")
    axes.set_ylabel("accuracy")
    axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(title)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=150)


# --- the model and its link ---------------------------------------------------------------------------------
def fast_decoding(settings: EvalSettings, device: torch.device) -> bool:
    chosen = flag("fast_decoding", settings.fast_decoding)
    return (device.type == "cuda" or FAST_ON_CPU) if chosen is None else chosen


def load_for_evaluation(
    location: str, settings: EvalSettings, device: torch.device, decoding_copy: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model in evaluation mode; on `device`, or left on the CPU when the fast decoder decodes on a copy
    of it on the accelerator (so that the accelerator holds one copy of the weights)."""
    dtype = torch.bfloat16 if bf16_enabled(settings.bf16) else torch.float32
    model, tokenizer = load_model(location, dtype=dtype, device=None if decoding_copy else device)
    require_finite_weights(model, location)
    return model.eval(), tokenizer


class Decoders:
    """The fast decoder of the models evaluated in turn: one for each architecture, kept while consecutive
    models share it, so its compiled step, cache and CUDA graphs serve them all."""

    def __init__(self, device: torch.device):
        self.device = device
        self.copies = device.type == "cuda"
        self._shape: str | None = None
        self._decoder: FastRollout | None = None

    def for_model(self, model: PreTrainedModel) -> FastRollout:
        config = {
            k: v
            for k, v in model.config.to_dict().items()
            if k not in ("_name_or_path", "transformers_version")
        }
        shape = json.dumps([type(model).__name__, config], sort_keys=True, default=str)
        if self._decoder is None or shape != self._shape or not self._decoder.copies:
            self._decoder = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._decoder = FastRollout(model, own_copy=self.copies)
            try:
                self._decoder.prepare()
            except InputError:  # parameters its config does not build (e.g. an added bias): decode on it
                log.info("fast decoding on the model itself: it cannot be copied from its config")
                self._decoder = FastRollout(model.to(self.device))
            self._shape = shape
        self._decoder.model = model
        return self._decoder


def check_prompt_lengths(eval_set: EvalSet, model: PreTrainedModel, prompts: Sequence[Sequence[int]]) -> None:
    """Refuse a problem longer than the model's context, naming it: it cannot be answered, and a megabyte-long
    one would keep attention busy for hours before failing."""
    context = getattr(model.config, "max_position_embeddings", None)
    if not context:
        return
    lengths = [len(ids) for ids in prompts]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] > context:
        raise InputError(
            f"data {eval_set.key!r}: problem {eval_set.problems['id'].iloc[longest]!r} is a prompt of "
            f"{lengths[longest]} tokens, more than the {context} the model reads (max_position_embeddings); "
            "drop it from the data, or evaluate a model with a longer context."
        )


def link_model(source: str) -> ModelLink:
    """Everything MLflow knows about `source` that lets a reader go from the evaluation to the model and
    back."""
    version = registry.version_named_by(source)
    tags = {"rlvr.model": source}
    if version is not None:
        tags |= {"rlvr.model_name": version.name, "rlvr.model_version": str(version.version)}
        if version.run_id:
            tags["rlvr.model_run_id"] = version.run_id
    elif run_id := run_id_of(source):
        tags["rlvr.model_run_id"] = run_id
    return ModelLink(tags, registry.logged_model_id(source), version)


def record_on_version(version: ModelVersion, run_id: str, results: dict[str, dict[str, float]]) -> None:
    """Tag the registered version with this run, so the registry lists the evaluations of each version."""
    summary = "; ".join(f"{label}: accuracy {m['accuracy']:.4g}" for label, m in results.items())
    registry.tag_version(version, f"{VERSION_TAG_PREFIX}{run_id}", summary)


# --- artifacts ----------------------------------------------------------------------------------------------
def _problem_text(messages) -> str:
    return next(m["content"] for m in reversed(list(messages)) if m["role"] == "user")


def _samples(evaluated: Sequence[tuple[EvalSet, list[ProblemScores]]]):
    for eval_set, problems in evaluated:
        for row, scores in zip(eval_set.problems.itertuples(), problems, strict=True):
            for index, sample_ in enumerate(scores.samples):
                yield eval_set.label, row, index, sample_


def samples_table(evaluated: Sequence[tuple[EvalSet, list[ProblemScores]]]) -> pd.DataFrame:
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
                "truncated": s.truncated,
                "vote": s.vote,
                "thought_tokens": s.generated.thought_tokens,
                "reasoning_tokens": s.generated.reasoning_tokens,
                "answer_tokens": s.generated.answer_tokens,
            }
            for label, row, index, s in _samples(evaluated)
        ]
    )


def samples_page(model: str, evaluated: Sequence[tuple[EvalSet, list[ProblemScores]]]) -> str:
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


def log_artifacts(model: str, evaluated: Sequence[tuple[EvalSet, list[ProblemScores]]], max_new: int) -> None:
    mlflow.log_table(samples_table(evaluated), artifact_file=SAMPLES_TABLE)
    mlflow.log_text(samples_page(model, evaluated), SAMPLES_PAGE)
    lengths = accuracy_by_thought_length(evaluated, max_new)
    mlflow.log_text(lengths.to_csv(index=False), LENGTHS_TABLE)
    with tempfile.TemporaryDirectory() as scratch:
        figure = Path(scratch) / Path(LENGTHS_FIGURE).name
        length_figure(lengths, f"Accuracy by thought length: {model}", figure)
        mlflow.log_artifact(str(figure), str(Path(LENGTHS_FIGURE).parent))


# --- sampling across processes ------------------------------------------------------------------------------
def sample_and_score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sets: Sequence[EvalSet],
    prompts: Sequence[Sequence[Sequence[int]]],
    settings: EvalSettings,
    decoder: FastRollout | None,
    label: str,
    phases: Phases,
) -> list[list[ProblemScores]]:
    """Every problem of every set sampled and scored, the problems shared among the processes (problem j of
    the whole list goes to process j mod their number), gathered in the main process, in order (elsewhere:
    an empty list). Sample s of problem i of set d draws the noise keyed by (seed, (d, i), s), so the
    results do not depend on the number of processes, nor on the model when several are compared."""
    state = process_state()
    everything = [(d, i) for d, eval_set in enumerate(sets) for i in range(len(eval_set.problems))]
    mine = everything[state.process_index :: state.num_processes]
    progress = Progress(
        len(mine), settings.num_samples, label, to_mlflow=state.is_main_process, show=state.is_main_process
    )
    threaded = SCORING_THREAD if SCORING_THREAD is not None else torch.device(state.device).type != "cpu"
    scorer = _Scorer(sets, prompts, mine, settings.num_samples, tokenizer, model.reasoning_vocab, threaded)

    def finished(index: int, sample_index: int, sampled: Sampled) -> None:
        progress.finished(index, sampled.emitted)
        scorer.add(index, sample_index, sampled)

    if decoder is not None:
        decoder.loop = LoopTimes()
    try:
        with phases("sampling"):
            sample(
                model, tokenizer, [prompts[d][i] for d, i in mine], settings.sampling,
                max_new_tokens=settings.max_new_tokens, num_samples=settings.num_samples,
                batch_size=batch_size(settings), seed=settings.seed, fast=decoder, device=state.device,
                uids=[(d << 32) + i for d, i in mine], on_finished=finished,
            )  # fmt: skip
    except BaseException:
        scorer.abandon()
        raise
    finally:
        progress.close()
    if decoder is not None and state.is_main_process:
        mlflow.log_metrics(decoder.loop.metrics(LOOP_PREFIX))
    with phases("scoring_tail"):
        scored = list(zip(mine, scorer.finish(), strict=True))
    gathered = dict(gather_object(scored)) if state.num_processes > 1 else dict(scored)
    if not state.is_main_process:
        return []
    return [[gathered[d, i] for i in range(len(eval_set.problems))] for d, eval_set in enumerate(sets)]


class _Scorer:
    """Scores each problem as soon as all its samples have ended; `threaded`, on a thread of its own: the
    decoder's loop only hands the samples over, so decoding the text and checking the answers (about 0.14 s a
    problem of 16 samples of 1024 tokens, measured on one H200's host) never holds up the decode steps queued
    on the accelerator. On a CPU the decoder's own steps need the interpreter, so there a thread only
    contends with them (SCORING_THREAD)."""

    def __init__(self, sets, prompts, mine, samples: int, tokenizer, vocab, threaded: bool):
        self.sets, self.prompts, self.mine, self.samples = sets, prompts, mine, samples
        self.tokenizer, self.vocab = tokenizer, vocab
        self.pending: list[list[Sampled | None]] = [[None] * samples for _ in mine]
        self.scored: list[ProblemScores | None] = [None] * len(mine)
        # one thread: the tokenizer and the answer checkers are used by one caller at a time
        self._worker = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlvr-scoring") if threaded else None
        )
        self._jobs: list[Future] = []

    def add(self, index: int, sample_index: int, sampled: Sampled) -> None:
        self.pending[index][sample_index] = sampled
        if all(s is not None for s in self.pending[index]):
            done, self.pending[index] = self.pending[index], []
            if self._worker is None:
                self._score(index, done)
            else:
                self._jobs.append(self._worker.submit(self._score, index, done))

    def _score(self, index: int, done: list[Sampled]) -> None:
        d, i = self.mine[index]
        generated = describe_all(done, self.prompts[d][i], self.tokenizer, self.vocab)
        truncated = [not s.stopped for s in done]
        self.scored[index] = score_problem(generated, truncated, self.sets[d].problems["solution"].iloc[i])

    def finish(self) -> list[ProblemScores]:
        """Every problem's scores, once the thread has scored the last; an error it met is raised here."""
        try:
            for job in self._jobs:
                job.result()
        finally:
            if self._worker is not None:
                self._worker.shutdown(wait=True, cancel_futures=True)
        missing = [self.mine[k] for k, scores in enumerate(self.scored) if scores is None]
        if missing:
            raise RuntimeError(f"problems {missing[:5]} ended sampling without all their samples")
        return self.scored  # type: ignore[return-value]

    def abandon(self) -> None:
        """Stop scoring (sampling failed): what is queued is dropped, the problem in hand finishes."""
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)


# --- the job ------------------------------------------------------------------------------------------------
class Phases:
    """Wall seconds by phase of one model's evaluation, logged as `time/<phase>_s`: where an evaluation's
    time outside decoding goes (loading, the decoding copy, the scoring left when sampling ends, logging)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def metrics(self) -> dict[str, float]:
        return {f"{TIME_PREFIX}/{name}_s": seconds for name, seconds in self.seconds.items()}


@contextlib.contextmanager
def _model_run(source: str, several: bool, main: bool) -> Iterator[None]:
    """Where one model's results go: the evaluation's run for one model, a child run of it for several."""
    if not main or not several:
        yield
        return
    with mlflow.start_run(run_name=f"evaluate {source}", nested=True, tags={"rlvr.step": "evaluate"}):
        yield


def evaluate_model(
    source: str,
    location: str,
    sets: Sequence[EvalSet],
    settings: EvalSettings,
    decoders: Decoders,
    several: bool,
) -> ModelResult | None:
    """Score one model on every set; in the main process log it (into a child run when `several`) and return
    its results, elsewhere None."""
    state = process_state()
    device = torch.device(state.device)
    fast = fast_decoding(settings, device)
    phases = Phases()
    with phases("load"):
        model, tokenizer = load_for_evaluation(
            location, settings, device, decoding_copy=fast and decoders.copies
        )
    with phases("prepare"):
        decoder = decoders.for_model(model) if fast else None
    prompts = [prompt_ids(tokenizer, list(eval_set.problems["prompt"])) for eval_set in sets]
    for eval_set, ids in zip(sets, prompts, strict=True):
        check_prompt_lengths(eval_set, model, ids)
    with _model_run(source, several, state.is_main_process):
        link = link_model(source) if state.is_main_process else None
        if link is not None:
            mlflow.set_tags(link.tags)
            log_params(
                {
                    **dataclasses.asdict(settings),
                    "model": source,
                    "reasoning_vocab_size": model.reasoning_vocab.size,
                }
            )
            if several:
                for eval_set in sets:
                    mlflow.log_input(eval_set.dataset, context="eval")
        log.info(
            "evaluating %s on %d problems (%s), %d samples each",
            source,
            sum(len(s.problems) for s in sets),
            ", ".join(s.label for s in sets),
            settings.num_samples,
        )
        scored = sample_and_score(
            model, tokenizer, sets, prompts, settings, decoder, model_label(source), phases
        )
        if link is None:
            return None
        ks = k_values(settings)
        results = {}
        with phases("logging"):
            for eval_set, problems in zip(sets, scored, strict=True):
                metrics = dataset_metrics(problems, ks)
                prefixed = {metric_key(eval_set.label, name): value for name, value in metrics.items()}
                mlflow.log_metrics(prefixed, model_id=link.model_id, dataset=eval_set.dataset)
                results[eval_set.key] = metrics
            log_artifacts(source, list(zip(sets, scored, strict=True)), settings.max_new_tokens)
            if link.version is not None:
                record_on_version(
                    link.version, mlflow.active_run().info.run_id, {s.label: results[s.key] for s in sets}
                )
        mlflow.log_metrics(phases.metrics())
    per_problem = {
        eval_set.key: pd.Series(
            [sum(s.correct for s in p.samples) / len(p.samples) for p in problems],
            index=list(eval_set.problems["id"]),
        )
        for eval_set, problems in zip(sets, scored, strict=True)
    }
    return ModelResult(results, per_problem)


def compare(
    sources: Sequence[str], sets: Sequence[EvalSet], results: Mapping[str, ModelResult]
) -> dict[str, dict[str, statistics.Paired]]:
    """Each later model against the first, per set: the paired per-problem difference in accuracy, logged
    as `compare/<label>/<b>_vs_<a>`."""
    labels = _model_labels(sources)
    reference = sources[0]
    comparisons: dict[str, dict[str, statistics.Paired]] = {}
    for eval_set in sets:
        comparisons[eval_set.key] = {}
        for other in sources[1:]:
            paired = statistics.paired(
                results[reference].per_problem[eval_set.key], results[other].per_problem[eval_set.key]
            )
            comparisons[eval_set.key][other] = paired
            name = f"{COMPARE_PREFIX}/{eval_set.label}/{labels[other]}_vs_{labels[reference]}"
            mlflow.log_metrics(paired.as_metrics(name))
    return comparisons


def _model_labels(sources: Sequence[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for source in sources:
        labels[source] = _unique(model_label(source), set(labels.values()))
    return labels


def comparison_table(
    sources: Sequence[str],
    sets: Sequence[EvalSet],
    metrics: Mapping[str, Mapping[str, Mapping[str, float]]],
    comparisons: Mapping[str, Mapping[str, statistics.Paired]],
) -> str:
    """Markdown: each model's accuracy per benchmark, and each later model's paired difference from the
    first."""
    lines = ["| model | " + " | ".join(s.label for s in sets) + " |", "|" + "---|" * (len(sets) + 1)]
    for source in sources:
        cells = [
            f"{m['accuracy']:.3f} [{m['accuracy_ci_low']:.3f}, {m['accuracy_ci_high']:.3f}]"
            for m in (metrics[source][s.key] for s in sets)
        ]
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| paired comparison (B - A) | benchmark | difference | 95% interval | p-value | problems |",
        "|---|---|---|---|---|---|",
    ]
    for eval_set in sets:
        for other, c in comparisons[eval_set.key].items():
            lines.append(
                f"| {other} - {sources[0]} | {eval_set.label} | {c.diff:+.3f} | [{c.ci_low:+.3f}, "
                f"{c.ci_high:+.3f}] | {c.p_value:.3g} | {c.units} |"
            )
    return "\n".join(lines) + "\n"


def evaluate(settings: EvalSettings) -> Evaluation | None:
    """Evaluate every model of `settings.model` on every dataset of `settings.data` in one MLflow run.

    Returns, in the main process, each model's metrics per data item (names as in the module docstring,
    without the `eval/<label>/` prefix) and the paired comparisons; None in the other processes.
    """
    validate(settings)
    items, sources = data_items(settings.data), model_items(settings.model)
    splits = splits_for(settings.split, items)
    state = process_state()
    end_with_launcher()
    main = state.is_main_process
    with contextlib.ExitStack() as stack:
        run = stack.enter_context(entrypoint_run("evaluate", {"rlvr.step": "evaluate"})) if main else None
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if main:
            log_params(dataclasses.asdict(settings))
        sets = load_eval_sets(items, splits, settings, scratch, logged=main)
        locations = [locate_model(source) for source in sources]  # an unknown model fails before sampling
        decoders = Decoders(torch.device(state.device))
        several = len(sources) > 1
        results = {
            source: evaluate_model(source, location, sets, settings, decoders, several)
            for source, location in zip(sources, locations, strict=True)
        }
        if not main:
            return None
        metrics = {source: result.metrics for source, result in results.items()}
        comparisons = compare(sources, sets, results) if several else {}
        if several:
            mlflow.log_text(comparison_table(sources, sets, metrics, comparisons), COMPARISON_TABLE)
    return Evaluation(run.info.run_id, metrics, comparisons)
