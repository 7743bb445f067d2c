"""Load a model from wherever a researcher names it, with its reasoning vocabulary attached; save it back.

A model is named by an offline preset, a local Hugging Face directory, an MLflow model URI (`runs:/...`,
`models:/name@alias`, ...) or a hub id, all through `load_model`. A directory that carries
`reasoning_token_map.json` restores its constraint; any other model gets the `N` rows asked for, and the
thought tags first where its tokenizer lacks them (`rlvr.thought_tags`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlvr.errors import InputError
from rlvr.presets import DIRECTORY_PRESETS, PRESET_NAMES, PRESETS, build_preset
from rlvr.surgery import attach, expand_model, make_faithful
from rlvr.thought_tags import add_thought_tags, check_added_tokens, missing_thought_tags
from rlvr.tracking import is_mlflow_uri, refuse_deleted_run
from rlvr.vocab import TOKEN_MAP_FILE, ReasoningVocab, ReasoningVocabError


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


def _load_base(source: str, directory: Path | None, dtype: torch.dtype, device, seed: int):
    if source in PRESETS:
        return build_preset(source, seed=seed, dtype=dtype, device=device)
    target = str(directory) if directory is not None else source
    try:
        tokenizer = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    except (OSError, ValueError, SafetensorError) as error:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if directory is not None:  # found, but its files do not load: truncated weights, broken JSON, ...
            where = "" if Path(source) == directory else f" ({directory})"
            raise ModelSourceError(
                f"model {source!r} is a model directory{where} whose files do not load ({reason}); it is "
                "incomplete or corrupt: copy or save it again, or pass an intact checkpoint."
            ) from error
        presets = ", ".join(sorted(PRESET_NAMES))
        raise ModelSourceError(
            f"model {source!r} is not a preset ({presets}), a local model directory, an "
            f"MLflow model URI or a reachable hub id ({reason}). Fix the name, or download the model where "
            "the hub is reachable and pass its directory."
        ) from error
    return model.to(device) if device is not None else model, tokenizer


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
    has_map = directory is not None and (directory / TOKEN_MAP_FILE).exists()
    try:
        saved = ReasoningVocab.load(directory) if has_map else None
        if saved is not None:
            check_added_tokens(saved, tokenizer)
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


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike
) -> Path:
    """A standard Hugging Face directory (safetensors) plus the token map."""
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
