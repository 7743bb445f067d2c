"""Offline model presets: architectures built from configs with seeded random weights, no hub needed.

`tiny-qwen3` is Qwen3 at toy width for fast tests; `qwen3-0.6b-shape` is Qwen3-0.6B's published architecture
(random weights) for GPU benchmarks. Both use the offline Qwen3 tokenizer.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM

from rlvr.tokenizer import qwen3_tokenizer

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


PRESETS: dict[str, Callable[[], tuple[Qwen3Config, PreTrainedTokenizerBase]]] = {
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


def build_preset(
    name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A preset's model (deterministic from `seed`) and tokenizer."""
    config, tokenizer = PRESETS[name]()
    config.name_or_path = name
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=_QWEN3_IDS["bos_token_id"],
    )
    return model, tokenizer
