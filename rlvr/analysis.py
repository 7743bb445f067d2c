"""How a reasoning vocabulary evolves over a training run: the numbers behind the `analyze` entry point.

Researchers ask how reasoning tokens drift from their standard twins. Each selected checkpoint of a training
run (and of a baseline run, for comparison) is loaded once and measured four ways:

- usage: constrained completions sampled on held-out prompts, and the share of their thought tokens that are
  reasoning ids, beside the share training itself logged per step (`reasoning/token_share`);
- drift: the cosine distance of every reasoning row from its standard twin's row (`twin`) and from its own
  row at the first analysed checkpoint (`start`), in the input and output embeddings, summarised over all N
  rows; and the rows of a few token families, projected to 2-D with PCA;
- entropy: the entropy of the constrained next-token distribution at positions inside thoughts, grouped by the
  token just read, teacher-forced on the data's worked solutions (on the samples when the data has none), so
  every checkpoint and both runs read the same text;
- one sampled completion, rendered with its reasoning tokens coloured.

The numbers are written as CSV/JSON beside their figures (`rlvr.plots`) and logged as artifacts of an
`analyze` run, which is tagged with the runs it analysed; they get a tag pointing back at it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sklearn.decomposition import PCA
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlvr import plots, thoughts, tracking
from rlvr.dataset import Split, load_split
from rlvr.errors import InputError, check_sampling, require_at_least_one
from rlvr.generation import Generated, as_messages, generate
from rlvr.job import checkpoints
from rlvr.models import load_model
from rlvr.rendering import latex_completion, markdown_completion
from rlvr.settings import param
from rlvr.surgery import make_faithful
from rlvr.vocab import ReasoningVocab

log = logging.getLogger(__name__)

LOGGED_SHARE = "reasoning/token_share"  # what training logs per step (rlvr.grpo)
DEFAULT_FAMILIES = 4
CHUNK_ROWS = 16384  # reasoning rows compared at once: a 16k x 1024 fp32 chunk is 64 MiB
TAG_PREFIX = "rlvr.analysis."  # + analyze run id, on each analysed run
QUANTILES = {"p05": 0.05, "median": 0.5, "p95": 0.95}
KEY = ("run", "run_id", "label", "arm", "step")  # the leading columns of every table: whose checkpoint


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


# --- the runs -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingRun:
    """A run as analyze sees it: its `role` ("training" or "baseline"), MLflow run and checkpoints."""

    role: str
    run: Run
    output_dir: Path
    checkpoints: tuple[tuple[int, Path], ...]

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def arm(self) -> str:
        tags, params = self.run.data.tags, self.run.data.params
        if "rlvr.arm" in tags:
            return tags["rlvr.arm"]
        return "baseline" if params.get("reasoning_vocab_size", "0") in ("0", "0.0") else "reasoning"

    @property
    def label(self) -> str:
        """How figures name the run: its arm and the start of its id."""
        return f"{self.arm} run {self.run_id[:8]}"

    def key(self, step: int) -> dict:
        """The `KEY` columns of a row about this run's checkpoint at `step`."""
        return dict(zip(KEY, (self.role, self.run_id, self.label, self.arm, step), strict=True))


def _get_run(run_id: str, name: str, reference: str) -> Run:
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as error:
        raise InputError(
            f"{name}={reference!r}: MLflow has no run {run_id} ({error.message}); check the id and that "
            "MLFLOW_TRACKING_URI points at the server that holds it."
        ) from error
    tracking.refuse_deleted_run(name, reference, run_id)
    return run


def evenly_spaced(items: Sequence, limit: int) -> list:
    """At most `limit` of `items` (0: all), evenly spaced, the first and the last always kept."""
    if not limit or len(items) <= limit:
        return list(items)
    picks = sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})
    return [items[i] for i in picks]


def resolve_run(reference: str, name: str, role: str, max_checkpoints: int = 0) -> TrainingRun:
    """The run behind `runs:/<run_id>` (checkpoints from its recorded output_dir) or behind an output_dir
    (run id from its mlflow_run.json)."""
    reference = reference.strip()
    if reference.startswith("runs:/"):
        run_id = reference.removeprefix("runs:/").strip("/")
        if not run_id or "/" in run_id:
            raise InputError(
                f"{name}={reference!r} is not runs:/<run_id>; pass the training run's id alone, no path."
            )
        run = _get_run(run_id, name, reference)
        recorded = run.data.params.get("output_dir")
        if not recorded:
            raise InputError(
                f"{name}={reference!r} records no output_dir parameter, so it is no training run; pass the "
                "run of a train_reasoning or train_baseline job."
            )
        output_dir = Path(recorded).expanduser()
        if not output_dir.is_dir():
            raise InputError(
                f"{name}={reference!r} wrote its checkpoints to {recorded!r}, which does not exist here "
                "(a relative path is read from the current directory). Run analyze on the machine that holds "
                f"them, or copy that directory here and pass {name}=<its local path>."
            )
    else:
        output_dir = Path(reference).expanduser()
        record = output_dir / tracking.RUN_FILE
        if not record.is_file():
            raise InputError(
                f"{name}={reference!r} is neither runs:/<run_id> nor a training output_dir (none has "
                f"{tracking.RUN_FILE}); pass one of those."
            )
        try:
            run_id = json.loads(record.read_text())["run_id"]
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(
                f"{name}={reference!r}: {record} is not a run record ({error}); pass runs:/<run_id> instead."
            ) from error
        run = _get_run(run_id, name, reference)
    found = checkpoints(output_dir, "config.json")
    if len(found) < 2:
        raise InputError(
            f"{name}={reference!r}: {output_dir} holds {len(found)} complete checkpoint(s), and change "
            "over training needs at least checkpoint-0 and one more; train with save_steps below max_steps."
        )
    return TrainingRun(role, run, output_dir, tuple(evenly_spaced(found, max_checkpoints)))


def held_out(settings: AnalyzeSettings, training: TrainingRun) -> Split:
    """The prompts (and worked solutions) to measure on: `data`, or else the data the training run read."""
    data = settings.data.strip() or training.run.data.params.get("data", "")
    if not data:
        raise InputError(
            "data is empty and the training run records none; pass data=<preprocess output_dir or URI>."
        )
    try:
        split = load_split(data, settings.split)
    except InputError as error:
        if settings.data.strip():
            raise
        raise InputError(
            f"the training run's data is not readable here ({error}); pass data=<held-out prompts>."
        ) from error
    return split.require_rows(data)


# --- token families -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """A standard token and its reasoning copies (rows E + i with s_i = standard_id), traced together."""

    standard_id: int
    label: str
    reasoning_ids: tuple[int, ...]


def token_items(spec: str) -> list[str | int]:
    """The tokens of the `tokens` parameter: strings, or ids written `#<id>` (JSON: plain integers)."""
    spec = spec.strip()
    if not spec:
        return []
    if not spec.startswith("["):
        return [int(word[1:]) if re.fullmatch(r"#\d+", word) else word for word in spec.split()]
    try:
        items = json.loads(spec)
    except json.JSONDecodeError as error:
        raise InputError(
            f"tokens={spec!r} is not a JSON list ({error}); write e.g. tokens='[\" the\", 42]'."
        ) from error
    if not isinstance(items, list) or not all(
        isinstance(i, (str, int)) and not isinstance(i, bool) for i in items
    ):
        raise InputError(f"tokens={spec!r} must be a JSON list of token strings and integer ids.")
    return items


def token_label(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """A token's text as a quoted literal, so spaces and line breaks show."""
    return repr(tokenizer.decode([token_id]))


def copies_of(vocab: ReasoningVocab) -> dict[int, tuple[int, ...]]:
    """Standard id -> its reasoning ids, in multiplicity order."""
    copies: dict[int, list[int]] = defaultdict(list)
    for index, standard in enumerate(vocab.standard_token_ids):
        copies[standard].append(vocab.base_vocab_size + index)
    return {standard: tuple(ids) for standard, ids in copies.items()}


def frequent_tokens(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, vocab: ReasoningVocab, count: int
) -> list[int]:
    """The `count` most frequent tokens of `texts` that are no control token and (with N > 0) have a copy."""
    control = set(vocab.control_token_ids)
    with_copy = set(vocab.standard_token_ids)
    counts: Counter[int] = Counter()
    for text in texts:
        counts.update(
            i
            for i in tokenizer.encode(text, add_special_tokens=False)
            if i not in control and (not with_copy or i in with_copy)
        )
    return [token for token, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:count]]


def token_families(
    spec: str, texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, vocab: ReasoningVocab
) -> list[Family]:
    """The families named by `spec`, or by default those of the most frequent tokens of `texts`."""
    ids: list[int] = []
    for item in token_items(spec):
        if isinstance(item, int):
            if not 0 <= item < vocab.tokenizer_size:
                raise InputError(
                    f"tokens: #{item} is no token id of the model (0..{vocab.tokenizer_size - 1})."
                )
            ids.append(item)
            continue
        encoded = tokenizer.encode(item, add_special_tokens=False)
        if len(encoded) != 1:
            raise InputError(
                f"tokens: {item!r} is {len(encoded)} tokens, not one; name single tokens, or ids as #<id>."
            )
        ids.append(encoded[0])
    if not ids:
        ids = frequent_tokens(texts, tokenizer, vocab, DEFAULT_FAMILIES)
    copies = copies_of(vocab)
    return [Family(i, token_label(tokenizer, i), copies.get(i, ())) for i in dict.fromkeys(ids)]


def family_texts(frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, vocab: ReasoningVocab) -> list[str]:
    """What default families are drawn from: the thoughts of the worked solutions, else the prompts."""
    references = [r for r in frame["reference"] if r.strip()]
    if references:
        return [
            _thought_of(tokenizer.encode(r, add_special_tokens=False), tokenizer, vocab) or r
            for r in references
        ]
    return [m["content"] for messages in frame["prompt"] for m in messages if m["role"] == "user"]


def _thought_of(ids: list[int], tokenizer: PreTrainedTokenizerBase, vocab: ReasoningVocab) -> str:
    parts = thoughts.structure(vocab, ids)
    tags = (vocab.think_start_id, vocab.think_end_id)
    inside = [i for i, t in zip(ids, parts.in_thought, strict=True) if t and i not in tags]
    return tokenizer.decode(inside, skip_special_tokens=True).strip()


# --- measurements -------------------------------------------------------------------------------------------
def usage(generated: Sequence[Sequence[Generated]]) -> dict[str, float]:
    """Thought tokens of the samples split into reasoning and standard ids, counted as training counts them
    (`<think>` and `</think>` included), so the shares compare with the logged `reasoning/token_share`."""
    flat = [g for samples in generated for g in samples]
    thought = sum(g.thought_tokens for g in flat)
    reasoning = sum(g.reasoning_tokens for g in flat)
    return {
        "completions": len(flat),
        "thought_tokens": thought,
        "reasoning_tokens": reasoning,
        "standard_tokens": thought - reasoning,
        "reasoning_share": reasoning / thought if thought else 0.0,
        "standard_share": (thought - reasoning) / thought if thought else 0.0,
        "closed_thought_rate": sum(g.closed for g in flat) / len(flat),
    }


def embedding_matrices(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The matrices whose rows are traced: `input` and `output`, or one `tied` matrix sharing storage."""
    inputs = model.get_input_embeddings().weight.detach()
    output = model.get_output_embeddings()
    if output is None or output.weight.data_ptr() == inputs.data_ptr():
        return {"tied": inputs}
    return {"input": inputs, "output": output.weight.detach()}


def cosine_distance(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Row-wise 1 - cos in fp32, exactly 0 for identical rows (rounding would leave ~1e-7)."""
    distance = (1 - F.cosine_similarity(left.float(), right.float(), dim=-1)).clamp(min=0)
    return distance.masked_fill((left == right).all(-1), 0.0)


def twin_distances(weight: torch.Tensor, vocab: ReasoningVocab, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """(N,) distance of each reasoning row from its standard twin's row; only one chunk of rows is copied."""
    base = vocab.base_vocab_size
    twins = torch.tensor(vocab.standard_token_ids, device=weight.device)
    parts = [
        cosine_distance(
            weight[base + start : base + start + chunk_rows], weight[twins[start : start + chunk_rows]]
        )
        for start in range(0, vocab.size, chunk_rows)
    ]
    return torch.cat(parts).cpu() if parts else torch.zeros(0)


def start_distances(
    weight: torch.Tensor, start: torch.Tensor, vocab: ReasoningVocab, chunk_rows: int = CHUNK_ROWS
) -> torch.Tensor:
    """(N,) distance of each reasoning row from `start`, the same rows at the first checkpoint (on CPU)."""
    base = vocab.base_vocab_size
    parts = [
        cosine_distance(weight[base + i : base + i + chunk_rows], start[i : i + chunk_rows].to(weight.device))
        for i in range(0, vocab.size, chunk_rows)
    ]
    return torch.cat(parts).cpu() if parts else torch.zeros(0)


def summarise(distances: torch.Tensor) -> dict[str, float]:
    """Mean, spread (population std, quantiles) and max of distances over all rows."""
    values = distances.double()
    quantiles = torch.quantile(values, torch.tensor(list(QUANTILES.values()), dtype=torch.float64))
    return {
        "rows": values.numel(),
        "mean": values.mean().item(),
        "std": values.std(correction=0).item(),
        **{name: q.item() for name, q in zip(QUANTILES, quantiles, strict=True)},
        "max": values.max().item(),
    }


def teacher_forced(
    frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int
) -> list[tuple[list[int], int]]:
    """(prompt + worked solution ids, prompt length), the solution as one thought (wrapped in the thought tags
    when its ids hold none), cut to `max_new_tokens`; empty when the data has no worked solutions."""
    vocab = tokenizer.reasoning_vocab
    sequences = []
    for messages, reference in zip(frame["prompt"], frame["reference"], strict=True):
        if not reference.strip():
            continue
        completion = tokenizer.encode(reference, add_special_tokens=False)
        if vocab.think_start_id not in completion:
            newline = tokenizer.encode("\n", add_special_tokens=False)
            completion = [vocab.think_start_id, *newline, *completion, *newline, vocab.think_end_id]
        prompt = tokenizer.encode(
            tokenizer.apply_chat_template(as_messages(messages), tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )
        sequences.append((prompt + completion[:max_new_tokens], len(prompt)))
    return sequences


@torch.inference_mode()
def thought_entropy(
    model: PreTrainedModel, sequences: Sequence[tuple[Sequence[int], int]], pad_id: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input token and entropy of the constrained next-token distribution, at every completion position inside
    a thought, for (ids, prompt length) pairs.

    Uses the same log-prob head as the GRPO loss (`fused_lm_head=True`), so the entropy is that of the masked
    distribution sampling draws from, and the thought state starts at each prompt's assistant turn.
    """
    vocab = model.reasoning_vocab
    device = next(model.parameters()).device
    tokens, entropies = [], []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        ids = torch.full((len(batch), max(len(s) for s, _ in batch)), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labelled = torch.zeros_like(ids, dtype=torch.bool)
        for row, (sequence, prompt_length) in enumerate(batch):
            ids[row, : len(sequence)] = torch.tensor(list(sequence))
            mask[row, : len(sequence)] = 1
            labelled[row, prompt_length : len(sequence)] = True
        prompt_lengths = torch.tensor([p for _, p in batch])
        ids, mask, labelled, prompt_lengths = (
            ids.to(device),
            mask.to(device),
            labelled.to(device),
            prompt_lengths.to(device),
        )
        out = model(
            input_ids=ids,
            attention_mask=mask,
            labels=ids.masked_fill(~labelled, -100),
            fused_lm_head=True,
            completion_start=prompt_lengths,
        )
        inside = thoughts.inside_after(vocab, ids, prompt_lengths)[:, :-1] & out.label_mask
        tokens.append(ids[:, :-1][inside].cpu())
        entropies.append(out.entropy[inside].float().cpu())
    if not tokens:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(tokens), torch.cat(entropies)


def project(rows: pd.DataFrame) -> pd.DataFrame:
    """PC1/PC2 of embedding rows, PCA fitted on all rows of a panel: per matrix, all families together (`view`
    "all") and each family alone (`view` "family"), with each fit's explained-variance ratios."""
    frames = []
    for _, group in rows.groupby("matrix", sort=False):
        panels = [("all", group)] + [("family", g) for _, g in group.groupby("family", sort=False)]
        for view, panel in panels:
            coords, ratios = _pca(np.stack(panel["vector"].to_list()))
            frames.append(
                panel.drop(columns="vector").assign(
                    view=view, pc1=coords[:, 0], pc2=coords[:, 1], var_pc1=ratios[0], var_pc2=ratios[1]
                )
            )
    return pd.concat(frames, ignore_index=True)


def _pca(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two principal coordinates (zeros past the data's rank, all zeros for identical rows), their ratios."""
    coords, ratios = np.zeros((len(vectors), 2)), np.zeros(2)
    components = min(2, len(vectors), vectors.shape[1])
    if np.ptp(vectors, axis=0).max() > 0:
        pca = PCA(n_components=components, svd_solver="full").fit(vectors)
        coords[:, :components] = pca.transform(vectors)
        ratios[:components] = pca.explained_variance_ratio_
    return coords, ratios


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
def logged_shares(runs: Sequence[TrainingRun]) -> pd.DataFrame:
    """The reasoning-token share each run logged per training step (its rollouts, not our samples)."""
    client = MlflowClient()
    records = [
        run.key(m.step) | {"reasoning_share": m.value}
        for run in runs
        for m in client.get_metric_history(run.run_id, LOGGED_SHARE)
    ]
    return pd.DataFrame(records, columns=[*KEY, "reasoning_share"])


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
    vocab = ReasoningVocab.load(path)
    return make_faithful(AutoTokenizer.from_pretrained(path), vocab), vocab


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
    tracking.check_tracking_server()
    training = resolve_run(settings.training_run, "training_run", "training", settings.max_checkpoints)
    runs = [training]
    if settings.baseline_run.strip():
        runs.append(resolve_run(settings.baseline_run, "baseline_run", "baseline", settings.max_checkpoints))
    split = held_out(settings, training)
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
    if not os.environ.get("MLFLOW_RUN_ID") and not tracking.experiment_in_environment():
        mlflow.set_experiment(experiment_id=training.run.info.experiment_id)  # analyses sit beside their run
    tags = {"rlvr.step": "analyze", "rlvr.training_run_id": training.run_id}
    if len(runs) > 1:
        tags["rlvr.baseline_run_id"] = runs[1].run_id
    with tracking.entrypoint_run("analyze", tags) as active, tempfile.TemporaryDirectory() as scratch:
        tracking.log_params(dataclasses.asdict(settings) | {
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
