"""Load a model from wherever a researcher names it, with its reasoning vocabulary attached; save it back.

A model is named by an offline preset, a local Hugging Face directory, an MLflow model URI (`runs:/...`,
`models:/name@alias`, ...) or a hub id, all through `load_model`. A directory that carries
`reasoning_token_map.json` restores its constraint, once the map is checked against the tokenizer and the
model; an expanded model without its map is refused (config.json records the expansion, and more rows than
the tokenizer plus padding betray one that does not); any other model gets the `N` rows asked for, and the
thought tags first where its tokenizer lacks them (`rlvr.thought_tags`).

Loading never runs code from the model: no `trust_remote_code`, weights from safetensors only, and a directory
whose config names code (`auto_map`) or whose weights are pickles only is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlvr.errors import InputError
from rlvr.presets import DIRECTORY_PRESETS, PRESET_NAMES, PRESETS, build_preset
from rlvr.surgery import attach, expand_model, make_faithful
from rlvr.thought_tags import add_thought_tags, missing_thought_tags
from rlvr.tracking.uris import is_mlflow_uri, refuse_deleted_run
from rlvr.vocab import (
    CONFIG_BASE,
    CONFIG_SIZE,
    MAP_FIX,
    TOKEN_MAP_FILE,
    ReasoningVocab,
    ReasoningVocabError,
    padded_rows,
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class ModelSourceError(InputError):
    """A model name that resolves to nothing loadable; the message says what was tried and how to fix it."""


def resolve_model_dir(source: str) -> Path | None:
    """The local Hugging Face directory behind `source` (downloading MLflow artifacts), or None for
    presets/hub ids."""
    if source in DIRECTORY_PRESETS:
        return DIRECTORY_PRESETS[source]()
    if is_mlflow_uri(source):
        import mlflow

        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source))
        except Exception as error:  # MLflow raises several types for a missing run, model or alias
            refuse_deleted_run("model", source)
            raise ModelSourceError(
                f"model {source!r} could not be fetched from MLflow ({type(error).__name__}: {error}); check "
                "the URI and that MLFLOW_TRACKING_URI points at the server that holds it."
            ) from error
        return _find_hf_dir(local, source)
    path = Path(source).expanduser()
    if path.is_dir():
        return _find_hf_dir(path, source)
    return None


def _find_hf_dir(root: Path, source: str) -> Path:
    if (root / "config.json").exists():
        return root
    found = sorted(
        p.parent for p in root.rglob("config.json") if (p.parent / "tokenizer_config.json").exists()
    )
    if not found:
        raise ModelSourceError(
            f"model {source!r} holds no Hugging Face model directory (config.json with a tokenizer); point "
            "at a directory written by save_pretrained or an rlvr checkpoint."
        )
    return found[0]


def refuse_code_and_pickles(directory: Path, source: str) -> None:
    """A model directory is data: refuse one that asks for its own code to be run, or whose weights exist
    only as pickles (which run code when unpickled)."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            config = json.loads((directory / name).read_text())
        except (OSError, ValueError):
            continue  # absent or broken: transformers says which when it reads the directory
        if isinstance(config, dict) and config.get("auto_map"):
            raise ModelSourceError(
                f"model {source!r}: {directory / name} names code of its own to run (auto_map: "
                f"{', '.join(sorted(config['auto_map']))}); rlvr runs no code from a model (no "
                "trust_remote_code): use a model whose architecture transformers implements."
            )
    files = [path.name for path in directory.iterdir() if path.is_file()]
    pickles = sorted(name for name in files if name.endswith(PICKLE_SUFFIXES) and "model" in name)
    if pickles and not any(name.endswith(".safetensors") for name in files):
        raise ModelSourceError(
            f"model {source!r}: {directory} holds its weights only as pickles ({', '.join(pickles)}), which "
            "can run code when loaded; rlvr loads safetensors only: convert them where you trust the file "
            "(save_pretrained writes model.safetensors) and pass that directory."
        )


def _load_base(source: str, directory: Path | None, dtype: torch.dtype, device, seed: int):
    if source in PRESETS:
        return build_preset(source, seed=seed, dtype=dtype, device=device)
    if directory is not None:
        refuse_code_and_pickles(directory, source)
    target = str(directory) if directory is not None else source
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            target, dtype=dtype, trust_remote_code=False, use_safetensors=True
        )
    except (OSError, ValueError, SafetensorError) as error:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if directory is not None:  # found, but its files do not load: truncated weights, broken JSON, ...
            where = "" if Path(source) == directory else f" ({directory})"
            raise ModelSourceError(
                f"model {source!r} is a model directory{where} whose files do not load ({reason}); it is "
                "incomplete or corrupt: copy or save it again, or pass an intact checkpoint."
            ) from error
        raise _unknown(source, reason) from error
    return model.to(device) if device is not None else model, tokenizer


def _unknown(source: str, reason: str) -> ModelSourceError:
    return ModelSourceError(
        f"model {source!r} is not a preset ({', '.join(sorted(PRESET_NAMES))}), a local model directory, an "
        f"MLflow model URI or a reachable hub id ({reason}). Fix the name, or download the model where "
        "the hub is reachable and pass its directory."
    )


def locate_model(source: str) -> str:
    """Where `source` loads from, checked without loading it: a preset's name, a local model directory (an
    MLflow model's artifacts downloaded), or a hub id whose config the hub serves. A job that names several
    models checks them all before it starts on the first."""
    if source in PRESETS:
        return source
    directory = resolve_model_dir(source)
    if directory is not None:
        return str(directory)
    try:
        AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise _unknown(
            source, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error
    return source


def load_model(
    source: str,
    reasoning_vocab_size: int | None = None,
    standard_token_ids: Sequence[int] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`(model, tokenizer)` with the reasoning-vocabulary constraint active and faithful decoding.

    A source that carries a non-empty token map keeps it (`reasoning_vocab_size`, if given, must agree). Any
    other source, a baseline (N = 0) checkpoint included, is expanded by `reasoning_vocab_size` rows
    (default 0) copied from `standard_token_ids` (default 0..N-1).
    """
    directory = resolve_model_dir(source) if source not in PRESETS else None
    model, tokenizer = _load_base(source, directory, dtype, device, seed)
    try:
        saved = saved_vocab(model, tokenizer, directory)
        if saved is not None and (saved.size or not reasoning_vocab_size):
            if reasoning_vocab_size is not None and reasoning_vocab_size != saved.size:
                raise ReasoningVocabError(
                    f"it already has a reasoning vocabulary of {saved.size} rows, but reasoning_vocab_size="
                    f"{reasoning_vocab_size} was asked for; pass {saved.size} or start from the base model."
                )
            vocab = attach(model, saved).reasoning_vocab
        else:
            # a plain model, or a baseline (N = 0) that grows a reasoning vocabulary now, e.g. a warm start
            added = add_thought_tags(model, tokenizer) or (saved.added_token_ids if saved else ())
            rows = model.get_input_embeddings().weight.shape[0]
            size = reasoning_vocab_size or 0
            vocab = ReasoningVocab.for_tokenizer(tokenizer, rows, size, standard_token_ids, added)
            expand_model(model, vocab)
    except ReasoningVocabError as error:  # say which model: several are named in one pipeline
        raise ReasoningVocabError(f"model {source!r}: {error}") from error
    return model, make_faithful(tokenizer, vocab)


def tokenizer_size(source: str) -> int:
    """How many token ids the model named `source` has once `load_model` has loaded it (thought tags it
    adds included), read from its tokenizer alone."""
    if source in PRESETS:
        return len(PRESETS[source]()[1])
    directory = resolve_model_dir(source)
    tokenizer = AutoTokenizer.from_pretrained(str(directory) if directory is not None else source)
    return len(tokenizer) + len(missing_thought_tags(tokenizer))


def saved_vocab(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path | None
) -> ReasoningVocab | None:
    """The token map that `directory` carries, checked against `tokenizer` and `model`; None for a model that
    has none and needs none. A model that is expanded (its config.json says so, or it has more embedding rows
    than its tokenizer plus padding) but has no map is refused: its reasoning rows would load as padding."""
    size, base = getattr(model.config, CONFIG_SIZE, None), getattr(model.config, CONFIG_BASE, None)
    path = directory / TOKEN_MAP_FILE if directory is not None else None
    if path is not None and path.exists():
        vocab = ReasoningVocab.load(directory, tokenizer)
        for says, value, name, recorded in (
            ("standard_token_ids hold {} rows", vocab.size, CONFIG_SIZE, size),
            ("base_vocab_size is {}", vocab.base_vocab_size, CONFIG_BASE, base),
        ):
            if recorded is not None and recorded != value:
                raise ReasoningVocabError(
                    f"{path}: {says.format(value)}, but config.json records {name}={recorded}; {MAP_FIX}."
                )
        return vocab
    fix = (
        f"copy its {TOKEN_MAP_FILE} from the checkpoint or run it came from into {directory}"
        if directory is not None
        else f"download the model directory with its {TOKEN_MAP_FILE} and pass its path"
    )
    if size:
        raise ReasoningVocabError(
            f"config.json records a reasoning vocabulary of {size} rows ({CONFIG_SIZE}), but there is "
            f"no {TOKEN_MAP_FILE}; without it those rows would load as never-sampled padding: {fix}."
        )
    rows = model.get_input_embeddings().weight.shape[0]
    multiple = getattr(model.config, "pad_vocab_size_multiple", None)
    plain = base if base is not None else padded_rows(len(tokenizer), multiple)
    if rows > plain:
        raise ReasoningVocabError(
            f"it has {rows} embedding rows, more than its tokenizer's {len(tokenizer)} ids plus padding "
            f"(at most {plain}): it looks expanded by a reasoning vocabulary, but has no {TOKEN_MAP_FILE}: "
            f"{fix}."
        )
    return None


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike
) -> Path:
    """A standard Hugging Face directory (safetensors) plus the token map."""
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
