"""The compiled (CUDA-graph) fast path on a GPU: same tokens as `generate`, and the constraint holds.

Skipped without a GPU; run on one with `python -m pytest -q tests/test_rollout_gpu.py`.
"""

import pytest
import torch
from conftest import QWEN3_N, bias_towards_forbidden, prompts
from transformers import GenerationConfig

from rlvr import load_model, thoughts
from rlvr.surgery import enable_fast_rollouts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
STOP = {"eos_token_id": [151645, 151643], "pad_token_id": 151643}


@pytest.fixture(scope="module")
def compiled():
    model, tokenizer = load_model("tiny-qwen3", reasoning_vocab_size=QWEN3_N, device="cuda")
    bias_towards_forbidden(model, model.reasoning_vocab)
    model.get_output_embeddings().bias.data = model.get_output_embeddings().bias.data.cuda()
    enable_fast_rollouts(model, compile=True)
    return model.eval(), tokenizer


def test_compiled_greedy_matches_generate(compiled):
    model, tokenizer = compiled
    batch = prompts(tokenizer, 12).to("cuda")
    config = GenerationConfig(max_new_tokens=32, do_sample=False, **STOP)
    fast = model.generate(**batch, generation_config=config)
    again = model.generate(**batch, generation_config=config)  # replays the captured graph
    reference = type(model).generate(model, **batch, generation_config=config)
    assert model.fast_rollout.calls == 2
    assert torch.equal(fast, reference) and torch.equal(again, reference)


def test_compiled_sampling_keeps_the_constraint(compiled):
    model, tokenizer = compiled
    vocab = model.reasoning_vocab
    batch = prompts(tokenizer, 64).to("cuda")
    config = GenerationConfig(max_new_tokens=48, do_sample=True, temperature=1.0, top_k=0, **STOP)
    table = vocab.forbidden_table("cuda")
    never = table[0] & table[1]
    start = batch["input_ids"].shape[1]
    reasoning_inside = 0
    for seed in range(4):
        torch.manual_seed(seed)
        out = model.generate(**batch, generation_config=config)
        before = thoughts.inside_after(vocab, out, start)[:, start - 1 : -1]
        completion = out[:, start:]
        live = ~torch.cumsum(torch.isin(completion, torch.tensor([151645, 151643], device="cuda")), 1).bool()
        reasoning = vocab.is_reasoning(completion)
        assert not (reasoning & ~before & live).any()
        assert not never[completion[live]].any()
        reasoning_inside += int((reasoning & before & live).sum())
    assert reasoning_inside > 1000
