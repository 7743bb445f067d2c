"""The compiled (CUDA-graph) fast path on a GPU: same tokens as `generate`, and the constraint holds.

Skipped without a GPU; run on one with `python -m pytest -q tests/test_rollout_gpu.py`.
"""

import pytest
import torch
from conftest import QWEN3_N, bias_towards_forbidden, prompts, ring_masks
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


def _compiled_block_attention(query, key, value, visible, scale):
    """Block attention compiled as the decode step compiles it: the block mask built inside the graph, static
    shapes (a fresh graph per shape, never a symbolic one)."""
    from rlvr import block_attention

    step = torch.compile(
        lambda q, k, v, seen: block_attention.attend(q, k, v, block_attention.block_mask(seen), scale),
        dynamic=False,
    )
    return step(query, key, value, visible)


def _dense_attention(query, key, value, visible, scale):
    """The reference: dense masked attention in float64 over the mask's columns, layout (B, 1, Hq, D)."""
    groups = query.shape[1] // key.shape[1]
    keys, values = (t[:, :, : visible.shape[1]].double().repeat_interleave(groups, 1) for t in (key, value))
    scores = (query.double() @ keys.transpose(-1, -2) * scale).masked_fill(
        ~visible[:, None, None, :], -torch.inf
    )
    return (scores.softmax(-1) @ values).transpose(1, 2)


def test_compiled_block_attention_never_reads_a_block_no_row_sees():
    """Blocks a row does not see hold NaN, which any read of them would spread; the output equals dense
    attention over the seen columns (bf16 tolerance)."""
    from rlvr import block_attention

    torch.manual_seed(0)
    batch, heads, kv_heads, dim, blocks = 24, 16, 8, 128, 10
    visible = ring_masks(batch, blocks * block_attention.BLOCK, 0, block_attention.BLOCK).cuda()
    query = torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    key, value = (
        torch.randn(batch, kv_heads, visible.shape[1], dim, device="cuda", dtype=torch.bfloat16) for _ in "kv"
    )
    unseen = ~visible.view(batch, blocks, -1).any(-1).repeat_interleave(block_attention.BLOCK, 1)
    assert unseen.any()
    poisoned = [t.masked_fill(unseen[:, None, :, None], float("nan")) for t in (key, value)]

    output = _compiled_block_attention(query, *poisoned, visible, 0.1)

    assert torch.isfinite(output).all()
    expected = _dense_attention(query, key, value, visible, 0.1)
    torch.testing.assert_close(output.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (16, 8, 128)])
def test_compiled_block_attention_equals_dense_in_fp32_with_holes_inside_spans(heads, kv_heads, dim):
    """fp32 and a tight tolerance, at the tiny test model's and Qwen3-0.6B's head shapes, one after the other
    through the same compiled function (a graph per shape; a symbolic-shape graph was wrong by whole units):
    spans that wrap the ring with holes inside them (as stalled draws leave), over a cache longer than the
    mask, so one column wrongly seen or missed in a partial block shows."""
    from rlvr import block_attention

    torch.manual_seed(1)
    batch, blocks = 24, 6
    visible = ring_masks(batch, blocks * block_attention.BLOCK, dim, block_attention.BLOCK).cuda()
    query = torch.randn(batch, heads, 1, dim, device="cuda")
    key, value = (
        torch.randn(batch, kv_heads, visible.shape[1] + block_attention.BLOCK, dim, device="cuda")
        for _ in "kv"
    )

    output = _compiled_block_attention(query, key, value, visible, 0.2)

    expected = _dense_attention(query, key, value, visible, 0.2)
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)


def _refilled(model, tokenizer, sampling, samples: int, slots: int):
    """Evaluation's path, compiled, through blocks and densely: prompts of different lengths, `samples` each,
    through `slots` slots refilled as sequences end (spans anywhere in the ring, wrapping it)."""
    from rlvr.generation import prompt_ids
    from rlvr.rollout import FastRollout

    texts = [[{"role": "user", "content": "Add " + " and ".join(["7"] * (1 + 3 * i))}] for i in range(6)]
    ids = prompt_ids(tokenizer, texts)
    options = dict(samples=samples, max_new_tokens=150, stop_ids=[151645, 151643], pad_id=151643, seed=2,
                   batch_size=slots, device="cuda")  # fmt: skip
    results = []
    for blocks in (True, False):
        fast = FastRollout(model, compile=True, blocks=blocks)
        results.append(fast.sample(ids, sampling, **options))
        assert fast.blocks is blocks
    return results


def test_compiled_refilled_slots_decode_the_same_through_blocks_as_densely(compiled):
    """Greedy: the same tokens either way, from sequences long enough to wrap the ring."""
    from rlvr.sampling import Sampling

    model, tokenizer = compiled
    through_blocks, dense = _refilled(model, tokenizer, Sampling(0.0), samples=2, slots=5)
    assert max(s.emitted for p in dense for s in p) > 128
    assert [[s.ids for s in p] for p in through_blocks] == [[s.ids for s in p] for p in dense]


def test_compiled_refilled_slots_sample_the_same_through_blocks_as_densely(compiled):
    """The sampled version (top-p, keyed noise, so stalls leave holes inside spans), 4 samples of each prompt
    at 24 slots and then 8: the second cache shape of the process is where a symbolic-shape recompilation
    made block attention wrong (BENCHMARKS.md)."""
    from rlvr.sampling import Sampling

    model, tokenizer = compiled
    for slots in (24, 8):
        through_blocks, dense = _refilled(model, tokenizer, Sampling(1.0, top_p=0.9), samples=4, slots=slots)
        assert [[s.ids for s in p] for p in through_blocks] == [[s.ids for s in p] for p in dense], slots
