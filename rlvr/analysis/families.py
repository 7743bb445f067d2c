"""The token families traced through training: a standard token and its reasoning copies, named by the
`tokens` parameter or, by default, the most frequent tokens of the data's worked solutions.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
from transformers import PreTrainedTokenizerBase

from rlvr import thoughts
from rlvr.errors import InputError
from rlvr.vocab import ReasoningVocab

DEFAULT_FAMILIES = 4


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
