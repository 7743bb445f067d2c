import os

# Tests never reach a hub: a hub id must fail at once with a clear message, not after network retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from rlvr.tokenizer import qwen3_tokenizer  # noqa: E402

QWEN3_N = 151646  # the reasoning_vocab_size users pass for Qwen3


@pytest.fixture(scope="session")
def qwen_tok():
    return qwen3_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_factory(qwen_tok):
    """An untied Llama whose embedding has exactly the tokenizer's rows (no padding rows)."""

    def build(seed: int = 0) -> LlamaForCausalLM:
        config = LlamaConfig(
            vocab_size=len(qwen_tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
            bos_token_id=qwen_tok.pad_token_id,
            eos_token_id=qwen_tok.eos_token_id,
            pad_token_id=qwen_tok.pad_token_id,
        )
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()

    return build
