"""Offline presets: `micro`'s tokenizer and model, determinism, and loading a saved preset from a
directory."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

import rlvr
from rlvr.presets import PRESETS, build_preset
from rlvr.presets.qwen3 import CHATML_TEMPLATE
from rlvr.presets.task import micro_tokenizer
from rlvr.rewards import DEFAULT_INSTRUCTION
from rlvr.synthetic import Difficulty, generate

FINGERPRINT = """
import hashlib, json, torch
from rlvr.presets import build_preset
model, tokenizer = build_preset("micro", seed=0)
weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.state_dict().values()))
print(json.dumps([tokenizer.backend_tokenizer.to_str(), weights.hexdigest()]))
"""


def _fingerprint(model, tokenizer) -> list[str]:
    weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.state_dict().values()))
    return [tokenizer.backend_tokenizer.to_str(), weights.hexdigest()]


@pytest.fixture(scope="module")
def micro():
    return build_preset("micro", seed=0)


def test_presets_are_listed():
    assert {"tiny-qwen3", "micro", "small", "qwen3-0.6b-shape"} <= set(PRESETS)


def test_micro_tokenizer_has_chatml_and_thought_tokens(micro):
    _, tokenizer = micro
    ids = tokenizer.convert_tokens_to_ids(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    )
    assert len(set(ids)) == 5 and tokenizer.unk_token_id is None
    assert tokenizer.encode("a<think>b</think>c<|im_end|>")[1:4:2] == ids[3:5]
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert tokenizer.chat_template == CHATML_TEMPLATE
    text = (
        "<|im_start|>assistant\n<think>\n1+1=2\n</think>\n\nThe answer is \\boxed{2}.<|im_end|><|endoftext|>"
    )
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == (
        "assistant\n<think>\n1+1=2\n</think>\n\nThe answer is \\boxed{2}."
    )


def test_micro_tokenizer_covers_the_task_compactly(micro):
    _, tokenizer = micro
    hard = generate(300, seed=5, difficulty=Difficulty(digits=4, max_ops=4, negative=True, factor_digits=3))
    texts = [DEFAULT_INSTRUCTION, "You are a careful mathematician. Ünïcödé √2 ≤ π"]
    texts += [t for p in generate(300, seed=5) + hard for t in (p.question, p.reference, p.solution)]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("12345") == tokenizer.convert_tokens_to_ids(list("12345"))  # digit by digit
    chat = [{"role": "user", "content": f"What is (12+3)*4? {DEFAULT_INSTRUCTION}"}]
    assert len(tokenizer.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]) <= 40


def test_micro_tokenizer_survives_save_and_auto_load(micro, tmp_path):
    _, tokenizer = micro
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    sample = generate(20, seed=1)
    for problem in sample:
        chat = [
            {"role": "user", "content": problem.question},
            {"role": "assistant", "content": problem.reference},
        ]
        assert (
            loaded.apply_chat_template(chat)["input_ids"] == tokenizer.apply_chat_template(chat)["input_ids"]
        )
    assert (loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        len(tokenizer),
    )


def test_micro_model_shape(micro):
    model, tokenizer = micro
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert 0.8e6 <= sum(p.numel() for p in model.parameters()) <= 1.5e6
    rows = model.config.vocab_size
    assert len(tokenizer) <= rows < len(tokenizer) + 64 and rows % 64 == 0
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, tokenizer.pad_token_id]


def test_small_is_tens_of_millions_of_parameters_on_the_task_tokenizer(micro):
    model, tokenizer = build_preset("small", seed=0)
    assert 20e6 <= sum(p.numel() for p in model.parameters()) <= 40e6
    assert tokenizer.get_vocab() == micro[1].get_vocab()
    assert model.config.vocab_size == micro[0].config.vocab_size
    ids = tokenizer("What is 47*8-3?", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_micro_is_deterministic_across_processes(micro):
    fresh = subprocess.run([sys.executable, "-c", FINGERPRINT], capture_output=True, text=True, check=True)
    assert json.loads(fresh.stdout.splitlines()[-1]) == _fingerprint(*micro)
    assert micro_tokenizer().backend_tokenizer.to_str() == micro[1].backend_tokenizer.to_str()
    other, _ = build_preset("micro", seed=1)
    assert not torch.equal(other.model.embed_tokens.weight, micro[0].model.embed_tokens.weight)


def test_micro_loads_with_a_full_reasoning_vocabulary_and_generates(micro):
    base_rows = micro[0].config.vocab_size
    model, tokenizer = rlvr.load_model("micro", reasoning_vocab_size=len(micro[1]))
    assert model.config.vocab_size == base_rows + len(tokenizer)
    chat = [{"role": "user", "content": "What is 3+4?"}]
    inputs = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=24, do_sample=True)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert new and all(i < len(tokenizer) or i >= base_rows for i in new)  # padding rows never sampled
    text, spans = tokenizer.decode_with_spans(new)
    assert len(spans) == len(new) and isinstance(text, str)


@pytest.mark.parametrize("name", ["micro", "tiny-qwen3"])
def test_saved_preset_loads_from_its_directory(name, tmp_path):
    model, tokenizer = rlvr.load_model(name, seed=3)
    rlvr.save_model(model, tokenizer, tmp_path)
    loaded, loaded_tokenizer = rlvr.load_model(str(tmp_path))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12*3?"}], return_tensors="pt")[
        "input_ids"
    ]
    assert loaded_tokenizer(" 7*8=56")["input_ids"] == tokenizer(" 7*8=56")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id
