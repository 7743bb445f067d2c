"""Decoding that is faithful to the reasoning vocabulary: reasoning ids read as their standard twins' text.

A tokenizer knows only the standard ids; a model with a reasoning vocabulary also emits the rows appended
after them. `rlvr.surgery.make_faithful` mixes `FaithfulDecodeMixin` into a tokenizer instance's class, so
text, rewards and logs see each reasoning id as its twin's string, and `decode_with_spans` tells which
characters came from reasoning tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenizers.decoders import DecodeStream

if TYPE_CHECKING:
    from rlvr.vocab import ReasoningVocab


@dataclass(frozen=True)
class TokenSpan:
    """Characters `[start, end)` of decoded text that came from one token; multiplicity 0 is a standard
    token."""

    start: int
    end: int
    multiplicity: int


class FaithfulDecodeMixin:
    """Decodes reasoning ids as their standard twins' text.

    Mixed into the class of an existing tokenizer instance (see `rlvr.surgery.make_faithful`), so the object
    stays the same `PreTrainedTokenizerBase` that TRL and MLflow accept, while `decode`/`batch_decode` stop
    dropping the ids that the tokenizer does not know.
    """

    reasoning_vocab: ReasoningVocab

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return super()._decode(self.reasoning_vocab.to_standard(token_ids), skip_special_tokens, **kwargs)

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return super().convert_ids_to_tokens(
                self.reasoning_vocab.to_standard([ids])[0], skip_special_tokens
            )
        return super().convert_ids_to_tokens(self.reasoning_vocab.to_standard(ids), skip_special_tokens)

    def decode_with_spans(
        self, token_ids: Sequence[int], skip_special_tokens: bool = False
    ) -> tuple[str, list[TokenSpan]]:
        """Text plus, per token, the characters it produced and its multiplicity (0 standard, 1 first copy,
        ...).

        Streams the ids through the backend's incremental decoder, so the cost is linear in the length and a
        character split over several byte tokens is credited to the token that completes it. The text is
        exactly `decode`'s (without `clean_up_tokenization_spaces`, which would move characters across
        tokens; Qwen's tokenizers and rlvr's presets do not clean up): what the stream still holds at the end
        (a character cut off by the length limit, which `decode` shows as U+FFFD) is credited to the last
        token.
        """
        vocab = self.reasoning_vocab
        ids = [int(i) for i in token_ids]
        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        step, backend, multiplicity = stream.step, self.backend_tokenizer, vocab.multiplicity_of
        pieces: list[str] = []
        spans: list[TokenSpan] = []
        position = 0
        # the ids mapped to their twins in one pass: per token, the loop only steps the stream
        for token_id, twin in zip(ids, vocab.to_standard(ids), strict=True):
            piece = step(backend, twin) or ""
            pieces.append(piece)
            spans.append(TokenSpan(position, position + len(piece), multiplicity(token_id)))
            position += len(piece)
        streamed = "".join(pieces)
        text = self.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
        if text != streamed:
            if not text.startswith(streamed):
                raise ValueError(
                    f"{type(self).__name__}'s decode differs from its incremental decoder inside the text "
                    f"({text[:60]!r} against {streamed[:60]!r}); decode_with_spans needs a decoder whose "
                    "output only grows."
                )
            last = spans[-1]
            spans[-1] = TokenSpan(last.start, len(text), last.multiplicity)
        return text, spans

    def __reduce__(self):
        # the class is made at run time and shares its base's name, so pickle it by its base
        base = next(cls for cls in type(self).__mro__ if not issubclass(cls, FaithfulDecodeMixin))
        return _restore_faithful, (base, self.__getstate__())


@functools.cache
def faithful_class(base: type) -> type:
    """The faithful-decoding subclass of a tokenizer class, one per base, named like it."""
    base = next(cls for cls in base.__mro__ if not issubclass(cls, FaithfulDecodeMixin))
    return type(base.__name__, (FaithfulDecodeMixin, base), {"__module__": base.__module__})


def _restore_faithful(base: type, state: dict):
    tokenizer = object.__new__(faithful_class(base))
    setstate = getattr(tokenizer, "__setstate__", None)
    if setstate is not None:
        setstate(state)
    else:
        tokenizer.__dict__.update(state)
    return tokenizer
