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


def test_compiled_block_attention_never_reads_a_block_no_row_sees():
    """Compiled as the decode step compiles it (the block mask built inside the graph): blocks a row does not
    see hold NaN, which any read of them would spread, and the output equals dense attention over the seen
    columns."""
    from rlvr import block_attention

    torch.manual_seed(0)
    batch, heads, kv_heads, dim, blocks = 24, 16, 8, 128, 10
    length = blocks * block_attention.BLOCK
    visible = torch.zeros(batch, length, dtype=torch.bool, device="cuda")
    for row in range(batch):  # a span that ends anywhere and may wrap around the ring, with holes
        span, end = 1 + (row * 97) % length, (row * 211) % length
        columns = (end - torch.arange(span, device="cuda")) % length
        visible[row, columns] = torch.rand(span, device="cuda") > 0.1
        visible[row, end] = True
    query = torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    key, value = (
        torch.randn(batch, kv_heads, length, dim, device="cuda", dtype=torch.bfloat16) for _ in "kv"
    )
    unseen = ~visible.view(batch, blocks, -1).any(-1).repeat_interleave(block_attention.BLOCK, 1)
    assert unseen.any()
    poisoned = [t.masked_fill(unseen[:, None, :, None], float("nan")) for t in (key, value)]

    step = torch.compile(
        lambda q, k, v, seen: block_attention.attend(q, k, v, block_attention.block_mask(seen), 0.1)
    )
    output = step(query, *poisoned, visible)

    repeated = [t.float().repeat_interleave(heads // kv_heads, 1) for t in (key, value)]
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.float(), *repeated, attn_mask=visible[:, None, None, :], scale=0.1
    ).transpose(1, 2)
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (16, 8, 128), (9, 3, 64)])
def test_compiled_block_attention_equals_dense_in_fp32_with_holes_inside_spans(heads, kv_heads, dim):
    """fp32 and a tight tolerance, at the tiny test model's, Qwen3-0.6B's and SmolLM2-135M's head shapes:
    spans that wrap the ring with single-column holes inside them (as stalled draws leave), so one column
    wrongly seen or missed in a partial block shows."""
    from rlvr import block_attention

    torch.manual_seed(1)
    batch, blocks = 24, 6
    length = blocks * block_attention.BLOCK
    visible = torch.zeros(batch, length, dtype=torch.bool, device="cuda")
    for row in range(batch):
        span, end = 2 + (row * 61) % (length - 2), (row * 149) % length
        columns = (end - torch.arange(span, device="cuda")) % length
        visible[row, columns] = True
        visible[row, columns[1 :: 7 + row % 5]] = False  # holes inside the span
        visible[row, end] = True
    query = torch.randn(batch, heads, 1, dim, device="cuda")
    key, value = (
        torch.randn(batch, kv_heads, length + block_attention.BLOCK, dim, device="cuda") for _ in "kv"
    )

    step = torch.compile(
        lambda q, k, v, seen: block_attention.attend(q, k, v, block_attention.block_mask(seen), 0.2)
    )
    output = step(query, key, value, visible)

    keys, values = (t[:, :, :length].double().repeat_interleave(heads // kv_heads, 1) for t in (key, value))
    scores = (query.double() @ keys.transpose(-1, -2) * 0.2).masked_fill(
        ~visible[:, None, None, :], -torch.inf
    )
    expected = (scores.softmax(-1) @ values).transpose(1, 2)  # float64, dense
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)


def test_compiled_refilled_slots_decode_the_same_through_blocks_as_densely(compiled):
    """Evaluation's path, compiled: prompts of different lengths through few refilled slots (spans anywhere
    in the ring, wrapping it), greedy: the same tokens either way. (Sampled tokens are not compared: the two
    kernels' fp32 rounding differs, and one near-tie drawn differently changes the rest of a sequence.)"""
    from rlvr.generation import prompt_ids
    from rlvr.rollout import FastRollout
    from rlvr.sampling import Sampling

    model, tokenizer = compiled
    texts = [[{"role": "user", "content": "Add " + " and ".join(["7"] * (1 + 3 * i))}] for i in range(6)]
    ids = prompt_ids(tokenizer, texts)
    options = dict(samples=2, max_new_tokens=150, stop_ids=[151645, 151643], pad_id=151643, seed=2,
                   batch_size=5, device="cuda")  # fmt: skip
    results = []
    for blocks in (True, False):
        fast = FastRollout(model, compile=True, blocks=blocks)
        results.append(fast.sample(ids, Sampling(0.0), **options))
        assert fast.blocks is blocks
    through_blocks, dense = ([[s.ids for s in p] for p in r] for r in results)
    assert max(s.emitted for p in results[1] for s in p) > 128
    assert through_blocks == dense


@pytest.mark.xfail(
    strict=True,
    reason="open: sampled tokens through blocks differed from the dense path on one H200 (BENCHMARKS.md, "
    "'Decode attention by cache blocks'); block attention stays off by default until this passes",
)
def test_compiled_refilled_slots_sample_the_same_through_blocks_as_densely(compiled):
    """The sampled version of the test above (top-p, keyed noise, so stalls leave holes inside spans)."""
    from rlvr.generation import prompt_ids
    from rlvr.rollout import FastRollout
    from rlvr.sampling import Sampling

    model, tokenizer = compiled
    texts = [[{"role": "user", "content": "Add " + " and ".join(["7"] * (1 + 3 * i))}] for i in range(6)]
    ids = prompt_ids(tokenizer, texts)
    options = dict(samples=4, max_new_tokens=150, stop_ids=[151645, 151643], pad_id=151643, seed=2,
                   batch_size=8, device="cuda")  # fmt: skip
    results = [
        FastRollout(model, compile=True, blocks=blocks).sample(ids, Sampling(1.0, top_p=0.9), **options)
        for blocks in (True, False)
    ]
    through_blocks, dense = ([[s.ids for s in p] for p in r] for r in results)
    assert through_blocks == dense
