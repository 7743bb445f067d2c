"""Block attention for the compiled decode step: its block mask lists exactly the blocks a row sees, it
attends as the dense masked attention does, and a rollout through it samples what the dense one samples.

Run eagerly here (FlexAttention's reference implementation); tests/test_rollout_gpu.py runs it compiled.
"""

import warnings

import pytest
import torch
from conftest import prompts, ring_masks
from transformers import GenerationConfig

from rlvr import block_attention
from rlvr.errors import InputError
from rlvr.generation import prompt_ids
from rlvr.rollout import FastRollout, decode_attention
from rlvr.sampling import Sampling

BLOCK = block_attention.BLOCK

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.mark.parametrize("seed", range(6))
def test_the_block_mask_lists_exactly_the_blocks_a_row_sees(seed):
    length = BLOCK * 7
    visible = ring_masks(9, length, seed, BLOCK)
    if seed == 0:
        visible[3, 2 * BLOCK : 3 * BLOCK] = True  # a block seen whole inside a span with holes

    mask = block_attention.block_mask(visible)

    blocks = visible.view(9, 7, BLOCK)
    for row in range(9):
        partial = [b for b in range(7) if blocks[row, b].any() and not blocks[row, b].all()]
        whole = [b for b in range(7) if blocks[row, b].all()]
        count = int(mask.kv_num_blocks[row, 0, 0])
        full = int(mask.full_kv_num_blocks[row, 0, 0])
        assert mask.kv_indices[row, 0, 0, :count].tolist() == partial
        assert mask.full_kv_indices[row, 0, 0, :full].tolist() == whole
    assert mask.shape == (9, 1, 1, length)
    # the mask proper, evaluated where a partial block needs it, is the visible table itself
    assert torch.equal(mask.to_dense()[:, 0, 0].bool(), blocks.any(-1))
    assert bool(mask.mask_mod(torch.tensor(4), 0, 0, torch.tensor(5))) == bool(visible[4, 5])


def test_a_width_that_is_not_whole_blocks_is_refused():
    with pytest.raises(ValueError, match=f"multiple of {BLOCK}"):
        block_attention.block_mask(torch.ones(2, BLOCK + 3, dtype=torch.bool))


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4), (6, 1)])
def test_block_attention_equals_dense_masked_attention(heads, kv_heads):
    """Through the decode attention function, as a model's layers call it, over a cache longer than the mask
    (the spare columns are never seen)."""
    torch.manual_seed(0)
    batch, length, dim = 7, BLOCK * 5, 16
    visible = ring_masks(batch, length, heads, BLOCK)
    module = type("Attention", (), {"num_key_value_groups": heads // kv_heads, "training": False})()
    query = torch.randn(batch, heads, 1, dim)
    key, value = (torch.randn(batch, kv_heads, length + BLOCK, dim) for _ in range(2))

    output, _ = decode_attention(module, query, key, value, block_attention.block_mask(visible), scaling=0.3)

    groups = heads // kv_heads
    repeated = [t[:, :, :length].repeat_interleave(groups, dim=1) for t in (key, value)]
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, *repeated, attn_mask=visible[:, None, None, :], scale=0.3
    )
    assert output.shape == (batch, 1, heads, dim)
    torch.testing.assert_close(output, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling", [Sampling(0.0), Sampling(1.0, top_p=0.9), Sampling(0.7, top_k=20)])
def test_refilled_slots_sample_the_same_through_blocks_as_densely(peaked_micro, sampling):
    """A rollout of prompts of different lengths through few slots (refilled as sequences end, so spans sit
    anywhere in the ring and wrap around it) draws the same tokens with the same log-probs either way."""
    model, tokenizer = peaked_micro
    texts = [[{"role": "user", "content": "1+" * (1 + (i * 5) % 9) + "1?"}] for i in range(6)]
    ids = prompt_ids(tokenizer, texts)
    options = dict(samples=3, max_new_tokens=70, stop_ids=[322], pad_id=320, seed=3, batch_size=4)
    dense = FastRollout(model, compile=False, blocks=False).sample(ids, sampling, **options)
    blocks = FastRollout(model, compile=False, blocks=True)
    through_blocks = blocks.sample(ids, sampling, **options)

    assert blocks.blocks
    assert [[s.ids for s in p] for p in through_blocks] == [[s.ids for s in p] for p in dense]
    assert max(s.emitted for p in dense for s in p) > BLOCK  # spans longer than a block


def test_training_rollouts_decode_the_same_through_blocks(peaked_micro):
    """The training path (`generate`: one batch, torch's generator) gives the same ids either way."""
    model, tokenizer = peaked_micro
    batch = prompts(tokenizer, 6)
    config = GenerationConfig(max_new_tokens=40, do_sample=False, eos_token_id=322, pad_token_id=320)
    outputs = []
    for blocks in (False, True):
        fast = FastRollout(model, compile=False, blocks=blocks)
        outputs.append(fast.generate(batch["input_ids"], batch["attention_mask"], config))
    assert torch.equal(outputs[0][0], outputs[1][0])
    torch.testing.assert_close(outputs[0][1], outputs[1][1], rtol=1e-5, atol=1e-5)


def test_blocks_are_asked_for_and_the_switch_is_checked(monkeypatch):
    monkeypatch.delenv(block_attention.ENV, raising=False)
    assert block_attention.wanted()  # on by default
    monkeypatch.setenv(block_attention.ENV, "Blocks")
    assert block_attention.wanted()
    monkeypatch.setenv(block_attention.ENV, "dense")
    assert not block_attention.wanted()
    monkeypatch.setenv(block_attention.ENV, "sparse")
    with pytest.raises(InputError, match="RLVR_DECODE_ATTENTION='sparse' is neither dense nor blocks"):
        block_attention.wanted()


def test_an_eager_rollout_attends_densely_unless_asked(peaked_micro):
    """Eagerly a step already reads only the columns in use; blocks stay off there unless asked for."""
    model, tokenizer = peaked_micro
    fast = FastRollout(model, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FlexAttention's eager warning would fail this
        fast.sample(prompt_ids(tokenizer, [[{"role": "user", "content": "1+1?"}]]), Sampling(0.0), samples=1,
                    max_new_tokens=4, stop_ids=[322], pad_id=320, seed=0)  # fmt: skip
    assert fast.blocks is False


def test_the_block_mask_is_built_inside_the_one_compiled_graph(peaked_micro, monkeypatch):
    """The compiled step with blocks traces without a graph break (CUDA graphs need one graph) and samples
    what the eager dense step samples; here compiled with the eager backend, on the GPU by inductor."""
    import torch._dynamo.utils

    from rlvr import rollout

    model, tokenizer = peaked_micro
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(
        rollout, "_COMPILED_STEP", torch.compile(rollout._decode_step, backend="eager", fullgraph=True)
    )
    ids = prompt_ids(tokenizer, [[{"role": "user", "content": "1+" * i + "1?"}] for i in range(4)])
    options = dict(samples=2, max_new_tokens=80, stop_ids=[322], pad_id=320, seed=1, batch_size=3)
    sampling = Sampling(0.7, top_p=0.9, top_k=40)
    fast = FastRollout(model, compile=True, blocks=True)
    compiled = fast.sample(ids, sampling, **options)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    eager = FastRollout(model, compile=False).sample(ids, sampling, **options)
    assert [[s.ids for s in p] for p in compiled] == [[s.ids for s in p] for p in eager]


def test_a_compiled_step_off_the_gpu_attends_densely_even_when_blocks_are_asked_for(
    peaked_micro, monkeypatch
):
    model, _ = peaked_micro
    monkeypatch.setenv(block_attention.ENV, "blocks")
    fast = FastRollout(model, compile=True)
    fast._decide(torch.device("cpu"))
    assert fast.blocks is False  # inductor's CPU kernels for it are not what this project measured


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,fits",
    [
        (16, 8, 128, True),
        (4, 2, 16, True),
        (9, 3, 64, False),
        (12, 4, 64, False),
        (32, 32, 80, False),
        (8, 8, 8, False),
        (12, 5, 64, False),
    ],
)
def test_which_attention_shapes_the_block_kernel_takes(heads, kv_heads, head_dim, fits):
    from transformers import Qwen3Config

    config = Qwen3Config(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         hidden_size=heads * head_dim)  # fmt: skip
    assert block_attention.supports(config) is fits


def test_the_decode_step_is_compiled_with_static_shapes_and_room_for_every_shape(monkeypatch):
    """A step recompiled with symbolic shapes (torch's default from a second shape on) gave wrong block
    attention on a GPU (BENCHMARKS.md); every cache shape must get a static graph of its own, within the
    compiler's limit on recompilations."""
    from rlvr import rollout

    asked = {}

    def recording_compile(fn, **options):
        asked.update(options)
        return fn

    monkeypatch.setattr(rollout, "_COMPILED_STEP", None)
    monkeypatch.setattr(rollout, "keep_compiled_kernels", lambda: None)  # no cache directory set for it
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    monkeypatch.setattr(torch, "compile", recording_compile)
    assert rollout._compiled_step() is rollout._decode_step
    assert asked["dynamic"] is False
    assert torch._dynamo.config.recompile_limit >= rollout.RECOMPILE_LIMIT >= 32
