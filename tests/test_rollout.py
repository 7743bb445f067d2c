"""The fast rollout path keeps every invariant of the constraint (run eagerly here; compiled on GPUs)."""

import os

import pytest
import torch
from conftest import QWEN3_N, THINK, bias_towards_forbidden, prompts
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
from transformers import GenerationConfig

from rlvr import load_model, thoughts
from rlvr.fused_decode import bypass_kernel_routing
from rlvr.rollout import (
    DECODE_ATTENTION,
    INDUCTOR_CACHE_ENV,
    KV_BUCKET,
    SPARE_COLUMNS,
    Rule,
    choose,
    decode_attention,
    keep_compiled_kernels,
    ring_columns,
    sequence_keys,
)
from rlvr.surgery import enable_fast_rollouts
from rlvr.vocab import ReasoningVocab

STOP = {"eos_token_id": [151645, 151643], "pad_token_id": 151643}


@pytest.fixture(scope="module")
def fast_model():
    model, tokenizer = load_model("tiny-qwen3", reasoning_vocab_size=QWEN3_N)
    bias_towards_forbidden(model, model.reasoning_vocab)
    enable_fast_rollouts(model, compile=False)
    return model.eval(), tokenizer


def test_greedy_fast_path_reproduces_generate_token_for_token(fast_model):
    model, tokenizer = fast_model
    batch = prompts(tokenizer, 12)  # prompts of different lengths: left padding and bucketing are exercised
    assert (batch["attention_mask"] == 0).any()
    config = GenerationConfig(max_new_tokens=24, do_sample=False, **STOP)
    served = model.fast_rollout.calls
    fast = model.generate(**batch, generation_config=config)
    assert model.fast_rollout.calls == served + 1
    reference = type(model).generate(model, **batch, generation_config=config)
    assert torch.equal(fast, reference)


def test_sampling_on_the_fast_path_obeys_confinement_and_never_samples_forbidden_rows(fast_model):
    model, tokenizer = fast_model
    vocab = model.reasoning_vocab
    batch = prompts(tokenizer, 32)
    config = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, **STOP)
    torch.manual_seed(0)
    out = model.generate(**batch, generation_config=config)
    start = batch["input_ids"].shape[1]
    before = thoughts.inside_after(vocab, out, start)[:, start - 1 : -1]
    completion = out[:, start:]
    live = ~torch.cumsum(
        torch.isin(completion, torch.tensor([151645, 151643])), 1
    ).bool()  # before the first stop
    reasoning = vocab.is_reasoning(completion)
    assert not (reasoning & ~before & live).any()
    table = vocab.forbidden_table("cpu")
    never = table[0] & table[1]  # forbidden in both states: padding rows and copies of control tokens
    assert not never[completion[live]].any()
    assert (reasoning & before).sum() > 50 and (completion == THINK).any()


def test_the_sampler_draws_from_the_masked_softmax_at_its_temperature(qwen_tok):
    """Gumbel-max over masked, tempered logits has the frequencies of softmax(mask(logits) / T)."""
    vocab = ReasoningVocab(
        base_vocab_size=6,
        tokenizer_size=5,
        think_start_id=3,
        think_end_id=4,
        standard_token_ids=(0, 1, 2),
        control_token_ids=(2, 3, 4),
    )
    logits = torch.tensor([0.5, 1.0, 2.0, -1.0, 0.0, 3.0, 0.7, 1.5, 2.5])
    draws = 40_000
    inside = torch.ones(draws, dtype=torch.bool)
    rows = torch.arange(draws)
    tokens, accepted, _ = choose(
        logits.expand(draws, -1).clone(),
        inside,
        vocab.forbidden_table("cpu"),
        torch.tensor(1 / 0.7),
        sequence_keys(0, rows, torch.zeros_like(rows)),  # one key per row: independent draws
        torch.zeros(draws, dtype=torch.bool),
        Rule(greedy=False, top_k=0, top_p=1.0, proposals=1),
    )
    assert accepted.all()
    expected = torch.softmax(vocab.mask_logits(logits / 0.7, torch.tensor(True)), -1)
    observed = torch.bincount(tokens, minlength=9).float() / draws
    assert observed[5] == 0 and observed[8] == 0  # the padding row and the copy of a control token
    torch.testing.assert_close(observed, expected, atol=0.01, rtol=0)


def test_requests_the_fast_path_does_not_cover_go_to_generate(fast_model):
    model, tokenizer = fast_model
    batch = prompts(tokenizer, 2)
    served = model.fast_rollout.calls
    torch.manual_seed(0)
    model.generate(
        **batch, generation_config=GenerationConfig(max_new_tokens=4, do_sample=True, top_p=0.9, **STOP)
    )
    model.generate(
        **batch, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    assert model.fast_rollout.calls == served


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_packed_decode_attention_equals_attention_over_repeated_heads(mask_kind):
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 3, 8, 2, 11, 16
    module = type("Attention", (), {"num_key_value_groups": heads // kv_heads, "training": False})()
    query = torch.randn(batch, heads, 1, dim)
    key, value = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    allowed = torch.rand(batch, 1, 1, length) > 0.4
    allowed[..., -1] = True  # the newest position is always visible
    mask = {
        "bool": allowed,
        "additive": torch.zeros(allowed.shape).masked_fill(~allowed, -1e9),
        "none": None,
    }[mask_kind]
    repeated = [t.repeat_interleave(heads // kv_heads, dim=1) for t in (key, value)]
    expected = torch.nn.functional.scaled_dot_product_attention(query, *repeated, attn_mask=mask, scale=0.3)

    output, _ = decode_attention(module, query, key, value, mask, scaling=0.3)

    assert output.shape == (batch, 1, heads, dim)  # the layout HF attention functions return
    torch.testing.assert_close(output, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_rollouts_decode_under_packed_attention_and_restore_the_models_own(fast_model, monkeypatch):
    model, tokenizer = fast_model
    seen = []
    original = model.config._attn_implementation
    monkeypatch.setattr(
        "rlvr.rollout._attend",
        lambda *a: (
            seen.append(model.config._attn_implementation)
            or torch.nn.functional.scaled_dot_product_attention(*a[:3], attn_mask=a[3], scale=a[4])
        ),
    )
    model.generate(
        **prompts(tokenizer, 2), generation_config=GenerationConfig(do_sample=False, max_new_tokens=3, **STOP)
    )

    # each of the three decode steps (the first forwards the prompt's last token), in every layer
    assert len(seen) == 3 * model.config.num_hidden_layers
    assert set(seen) == {DECODE_ATTENTION}
    assert model.config._attn_implementation == original


@pytest.mark.parametrize(
    "options",
    [
        {"typical_p": 0.9},
        {"min_length": 40},
        {"sequence_bias": {(5,): 1.0}},
        {"epsilon_cutoff": 1e-3},
        {"renormalize_logits": True},
        {"top_k": 50},
    ],
)
def test_the_fast_path_serves_only_what_its_allowlist_names(fast_model, options):
    """Any generation option that reshapes the distribution goes to `generate`, listed or not in a
    denylist."""
    model, tokenizer = fast_model
    served = model.fast_rollout.calls
    config = GenerationConfig(max_new_tokens=2, do_sample=True, **{"top_k": 0, **STOP, **options})
    model.generate(**prompts(tokenizer, 2), generation_config=config)
    assert model.fast_rollout.calls == served


def test_the_fast_path_fills_unset_fields_from_the_models_generation_config_as_generate_does():
    """A Qwen3-style generation_config (T=0.6, top-k 20, top-p 0.95): a request that leaves them unset samples
    with them, so the fast path must not serve it at T=1; with neutral top-k/p it serves it at T=0.6."""
    model, tokenizer = load_model("tiny-qwen3", reasoning_vocab_size=QWEN3_N)
    bias_towards_forbidden(model, model.reasoning_vocab)
    enable_fast_rollouts(model, compile=False)
    model.generation_config.update(do_sample=True, temperature=0.6, top_k=20, top_p=0.95)
    batch = prompts(tokenizer, 4)
    model.generate(**batch, generation_config=GenerationConfig(max_new_tokens=3, **STOP))
    assert model.fast_rollout.calls == 0
    model.generation_config.update(top_k=0, top_p=1.0)
    model.record_sampling_logprobs = True
    torch.manual_seed(0)
    out = model.generate(**batch, generation_config=GenerationConfig(max_new_tokens=6, **STOP))
    assert model.fast_rollout.calls == 1
    start = batch["input_ids"].shape[1]
    labels = out.clone()
    labels[:, :start] = -100
    attention = torch.cat([batch["attention_mask"], torch.ones_like(out[:, start:])], 1)
    for temperature, agrees in ((0.6, True), (1.0, False)):
        model.reasoning_temperature = temperature
        with torch.no_grad():
            scored = model(
                input_ids=out, attention_mask=attention, labels=labels, fused_lm_head=True
            ).log_probs
        close = torch.allclose(scored[:, start - 1 :], model.sampling_logprobs, atol=5e-4, rtol=1e-4)
        assert close is agrees, temperature


def test_a_low_precision_copy_that_would_drop_a_parameter_is_refused():
    from rlvr.errors import InputError

    model, _ = load_model("tiny-qwen3", reasoning_vocab_size=4)
    bias_towards_forbidden(model, model.reasoning_vocab)  # adds lm_head.bias, which the config does not build
    with pytest.raises(InputError, match=r"lm_head.bias.*fast_rollouts=false"):
        enable_fast_rollouts(model, compile=False, dtype=torch.bfloat16)
    plain, _ = load_model("tiny-qwen3", reasoning_vocab_size=4)
    enable_fast_rollouts(plain, compile=False, dtype=torch.bfloat16)  # every parameter copies


def test_compiled_kernels_are_kept_in_the_rlvr_cache_unless_the_user_chose_a_place(monkeypatch, tmp_path):
    monkeypatch.setenv("RLVR_CACHE", str(tmp_path))
    ours = str(tmp_path / "torchinductor")
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, default_cache_dir())  # what torch writes there once imported
    keep_compiled_kernels()
    assert os.environ[INDUCTOR_CACHE_ENV] == ours
    monkeypatch.delenv(INDUCTOR_CACHE_ENV)
    keep_compiled_kernels()
    assert os.environ[INDUCTOR_CACHE_ENV] == ours
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(tmp_path / "mine"))
    keep_compiled_kernels()
    assert os.environ[INDUCTOR_CACHE_ENV] == str(tmp_path / "mine")


@pytest.mark.parametrize("new_tokens", [5, 24, 61])
def test_every_cache_row_and_every_attended_span_has_an_aligned_length(fast_model, new_tokens):
    # a row of 641 columns made the attention's batched products fall back to unaligned GPU kernels
    model, tokenizer = fast_model
    batch = prompts(tokenizer, 6)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, **STOP)
    fast = model.fast_rollout
    fast._caches.clear()
    out = model.generate(**batch, generation_config=config)
    assert out.shape[1] > batch["input_ids"].shape[1]
    (cache,) = fast._caches.values()
    columns = cache.slot_keys[0].shape[2]
    assert columns % KV_BUCKET == 0 and all(k.shape[2] == columns for k in cache.slot_keys)
    ring = columns - SPARE_COLUMNS
    assert ring % KV_BUCKET == 0
    assert ring >= batch["input_ids"].shape[1] - 1 + new_tokens  # the ring holds every sequence whole
    assert ring_columns(ring - KV_BUCKET + 1) == ring == ring_columns(ring)


def test_kernel_routing_is_bypassed_without_changing_outputs():
    """transformers >= 5.25 wraps its attention classes in `kernels`' routing, whose context variable the
    compiled block-attention step left set, so its second call recompiled the whole graph (the one-graph test
    in test_block_attention.py caught it); bypassed, each routed module runs its class's own forward and
    gives the wrapped forward's outputs."""
    model, tokenizer = load_model("tiny-qwen3")
    model.eval()
    routed = [m for m in model.modules() if "_kernel_funcs" in m.__dict__]
    if not routed:
        pytest.skip("this transformers puts no kernel routing on Qwen3's attention")
    ids = torch.tensor([tokenizer.encode("1+1=2, 2+2=4")])
    with torch.no_grad():
        before = model(ids).logits
        assert bypass_kernel_routing(model) is model
        assert all(m.forward.__func__ is type(m).forward.__wrapped__ for m in routed)
        assert torch.equal(model(ids).logits, before)
