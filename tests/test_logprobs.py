"""The fused log-prob head gives the unfused head's log-probs, entropies and gradients (invariant 4)."""

import pytest
import torch
from conftest import QWEN3_N, bias_towards_forbidden, prompts
from torch.utils._python_dispatch import TorchDispatchMode

import rlvr.logprobs as head
from rlvr import load_model, thoughts
from rlvr.surgery import attach, expand_model
from rlvr.vocab import ReasoningVocab

# a vocabulary with every kind of row: tokenizer ids 0..34 (controls 2, 3, 4, 33, 34; tags 3 and 4), padding
# rows 35..39, and 30 reasoning rows 40..69, copies of ids 0..29 (so rows 42..44 copy control tokens)
SMALL = ReasoningVocab(
    base_vocab_size=40,
    tokenizer_size=35,
    think_start_id=3,
    think_end_id=4,
    standard_token_ids=tuple(range(30)),
    control_token_ids=(2, 3, 4, 33, 34),
)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 7 rows by 13 tokens: every range spans several vocabulary chunks, every batch several token
    chunks."""
    monkeypatch.setattr(head, "VOCAB_CHUNK", 7)
    monkeypatch.setattr(head, "CHUNK_ELEMENTS", 7 * 13)


def unfused(logits, labels, inside, vocab, temperature):
    """Today's head the plain way: the whole (T, V) logits in float64, masked by each token's state,
    normalised; returns each label's log-prob and the entropy."""
    forbidden = vocab.forbidden_table(logits.device)[inside.long()]
    log_p = (logits.double() / temperature).masked_fill(forbidden, float("-inf")).log_softmax(-1)
    entropy = -(log_p.exp() * log_p.masked_fill(forbidden, 0.0)).sum(-1)
    return log_p.gather(-1, labels[:, None]).squeeze(-1), entropy


def allowed_labels(vocab, inside, generator):
    table = vocab.forbidden_table("cpu")
    weights = (~table[inside.long()]).float()
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def assert_same_gradient(got, want, name=""):
    """Equal up to fp32 rounding: the tolerance scales with the gradient's largest entry."""
    scale = want.abs().max().item()
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5 * scale, msg=name)


def loss_and_grads(log_probs, entropy, params, generator, terms=("log_probs", "entropy")):
    """A loss that weighs log-probs and entropies (those in `terms`) differently per token, and its
    gradients."""
    weights = torch.randn(2, log_probs.shape[0], generator=generator, dtype=torch.float64)
    outputs = {"log_probs": log_probs, "entropy": entropy}
    loss = sum((outputs[name].double() * weights[i]).sum() for i, name in enumerate(outputs) if name in terms)
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_head_equals_the_unfused_head_inside_and_outside_thoughts(small_tiles, temperature, with_bias):
    generator = torch.Generator().manual_seed(0)
    tokens, width = 45, 16
    hidden = torch.randn(tokens, width, generator=generator, requires_grad=True)
    weight = torch.randn(SMALL.total_size, width, generator=generator, requires_grad=True)
    bias = torch.randn(SMALL.total_size, generator=generator, requires_grad=True) if with_bias else None
    inside = torch.rand(tokens, generator=generator) < 0.5
    inside[:15] = False  # the first token chunk lies outside every thought: its reasoning rows are skipped
    labels = allowed_labels(SMALL, inside, generator)
    params = [p for p in (hidden, weight, bias) if p is not None]

    fused = head.constrained_token_logprobs(hidden, weight, bias, labels, SMALL, inside, temperature)
    logits = torch.nn.functional.linear(
        hidden.double(), weight.double(), None if bias is None else bias.double()
    )
    expected = unfused(logits, labels, inside, SMALL, temperature)

    assert fused[0].dtype == fused[1].dtype == torch.float32
    torch.testing.assert_close(fused[0].double(), expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(fused[1].double(), expected[1], atol=1e-5, rtol=0)
    seed = torch.Generator().manual_seed(1)
    for got, want in zip(
        loss_and_grads(*fused, params, seed),
        loss_and_grads(*expected, params, torch.Generator().manual_seed(1)),
        strict=True,
    ):
        assert_same_gradient(got, want)


@pytest.mark.parametrize("term", ["log_probs", "entropy"])
def test_a_loss_of_one_output_gets_the_unfused_heads_gradients(small_tiles, term):
    """GRPO's loss uses the log-probs and only logs the entropy (an entropy bonus would use both): the
    gradient of either output alone is right, the other's absent gradient skipped."""
    generator = torch.Generator().manual_seed(8)
    hidden = torch.randn(30, 16, generator=generator, requires_grad=True)
    weight = torch.randn(SMALL.total_size, 16, generator=generator, requires_grad=True)
    inside = torch.rand(30, generator=generator) < 0.5
    labels = allowed_labels(SMALL, inside, generator)
    fused = head.constrained_token_logprobs(hidden, weight, None, labels, SMALL, inside, 0.7)
    expected = unfused(
        torch.nn.functional.linear(hidden.double(), weight.double()), labels, inside, SMALL, 0.7
    )
    for got, want in zip(
        loss_and_grads(*fused, [hidden, weight], torch.Generator().manual_seed(9), (term,)),
        loss_and_grads(*expected, [hidden, weight], torch.Generator().manual_seed(9), (term,)),
        strict=True,
    ):
        assert_same_gradient(got, want)


def test_forbidden_rows_get_no_probability_and_no_gradient(small_tiles):
    """With padding rows and copies of control tokens the likeliest rows by far, each state's allowed ids
    still hold all the probability, and the forbidden rows get no gradient."""
    generator = torch.Generator().manual_seed(2)
    table = SMALL.forbidden_table("cpu")
    never = table.all(0)  # padding rows and copies of control tokens
    inside = torch.tensor([True, False, True, False])
    allowed = [(~table[int(state)]).nonzero().squeeze(1) for state in inside]
    # every token scored once for each id its state allows
    rows = torch.cat([torch.full((len(ids),), token) for token, ids in enumerate(allowed)])
    hidden = torch.randn(len(inside), 8, generator=generator)[rows].requires_grad_()
    weight = torch.randn(SMALL.total_size, 8, generator=generator, requires_grad=True)
    bias = torch.zeros(SMALL.total_size).masked_fill(never, 30.0)
    log_probs, entropy = head.constrained_token_logprobs(
        hidden, weight, bias, torch.cat(allowed), SMALL, inside[rows]
    )
    (log_probs.sum() + entropy.sum()).backward()
    assert torch.isfinite(entropy).all()
    totals = torch.zeros(len(inside)).index_add(0, rows, log_probs.detach().exp())
    torch.testing.assert_close(totals, torch.ones(len(inside)))
    assert weight.grad[never].abs().max() == 0 and weight.grad[~never].abs().max() > 0


def test_the_head_never_holds_a_tensor_as_large_as_the_logits(monkeypatch):
    """Forward and backward over 4000 rows: the largest tensor any op makes is the unembedding's gradient,
    far below the (tokens, vocabulary) logits an unfused head holds."""
    monkeypatch.setattr(head, "VOCAB_CHUNK", 512)
    monkeypatch.setattr(head, "CHUNK_ELEMENTS", 512 * 64)
    vocab = ReasoningVocab(
        base_vocab_size=2000,
        tokenizer_size=1990,
        think_start_id=3,
        think_end_id=4,
        standard_token_ids=tuple(range(1990)) + (0,) * 10,
        control_token_ids=(2, 3, 4),
    )
    generator = torch.Generator().manual_seed(3)
    tokens = 400
    hidden = torch.randn(tokens, 32, generator=generator, requires_grad=True)
    weight = torch.randn(vocab.total_size, 32, generator=generator, requires_grad=True)
    inside = torch.rand(tokens, generator=generator) < 0.5
    labels = allowed_labels(vocab, inside, generator)

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, tuple | list) else (out,):
                if isinstance(tensor, torch.Tensor):
                    Largest.numel = max(Largest.numel, tensor.numel())
            return out

    with Largest():
        log_probs, entropy = head.constrained_token_logprobs(hidden, weight, None, labels, vocab, inside)
        (log_probs.sum() + entropy.sum()).backward()
    assert Largest.numel == weight.numel() < tokens * weight.shape[0] / 10


@pytest.fixture(scope="module")
def sampled_tiny():
    """tiny-qwen3 (tied embeddings) with N = 151646 and a bias, and completions it sampled that open and
    close thoughts."""
    model, tokenizer = load_model("tiny-qwen3", reasoning_vocab_size=QWEN3_N)
    bias_towards_forbidden(model, model.reasoning_vocab)
    attach(model, model.reasoning_vocab, temperature=0.7)
    batch = prompts(tokenizer, 4)
    torch.manual_seed(0)
    out = model.generate(**batch, max_new_tokens=20, do_sample=True, top_k=0, top_p=1.0, temperature=0.7)
    return model, batch, out


def model_inputs(batch, sequences):
    start = batch["input_ids"].shape[1]
    attention = torch.cat([batch["attention_mask"], torch.ones_like(sequences[:, start:])], 1)
    labels = sequences.masked_fill(attention == 0, -100)
    labels[:, :start] = -100
    return start, attention, labels


def check_model_against_unfused(model, batch, sequences, temperature, atol=1e-5):
    vocab = model.reasoning_vocab
    start, attention, labels = model_inputs(batch, sequences)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = model(input_ids=sequences, attention_mask=attention, labels=labels, fused_lm_head=True)
    valid = fused.label_mask
    logits = type(model).forward(model, input_ids=sequences, attention_mask=attention).logits[:, :-1]
    inside = thoughts.inside_after(vocab, sequences, start)[:, :-1]
    expected = unfused(logits[valid], labels[:, 1:][valid], inside[valid], vocab, temperature)

    assert inside[valid].any() and (~inside[valid]).any()  # both states are scored
    torch.testing.assert_close(fused.log_probs[valid].double(), expected[0], atol=atol, rtol=0)
    torch.testing.assert_close(fused.entropy[valid].double(), expected[1], atol=atol, rtol=0)
    scored = (fused.log_probs[valid], fused.entropy[valid])
    got = loss_and_grads(*scored, params, torch.Generator().manual_seed(4))
    want = loss_and_grads(*expected, params, torch.Generator().manual_seed(4))
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, got, want, strict=True):
        assert_same_gradient(a, b, name)


def test_tied_model_scores_and_trains_as_the_unfused_head(sampled_tiny):
    model, batch, sequences = sampled_tiny
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    check_model_against_unfused(model, batch, sequences, temperature=0.7)


def test_untied_model_scores_and_trains_as_the_unfused_head(qwen_tok, tiny_llama_factory):
    model = tiny_llama_factory(seed=5)
    vocab = ReasoningVocab.for_tokenizer(qwen_tok, len(qwen_tok), 64, list(range(100, 164)))
    expand_model(model, vocab)
    bias_towards_forbidden(model, vocab)
    batch = prompts(qwen_tok, 3)
    torch.manual_seed(1)
    sequences = model.generate(**batch, max_new_tokens=16, do_sample=True, top_k=0)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    check_model_against_unfused(model, batch, sequences, temperature=1.0)


def test_under_bf16_autocast_the_fused_head_rounds_as_the_unfused_head_did(sampled_tiny):
    """Under autocast both heads form bf16 logits and do the rest in fp32, so they agree far more closely
    than either agrees with fp32 scoring."""
    model, batch, sequences = sampled_tiny
    vocab = model.reasoning_vocab
    start, attention, labels = model_inputs(batch, sequences)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(input_ids=sequences, attention_mask=attention, labels=labels, fused_lm_head=True)
        hidden = model.base_model(input_ids=sequences, attention_mask=attention).last_hidden_state[:, :-1]
        head_ = model.get_output_embeddings()
        logits = torch.nn.functional.linear(hidden, head_.weight, head_.bias).float()
    with torch.no_grad():
        exact = model(input_ids=sequences, attention_mask=attention, labels=labels, fused_lm_head=True)
    valid = fused.label_mask
    inside = thoughts.inside_after(vocab, sequences, start)[:, :-1]
    rounded = unfused(logits[valid], labels[:, 1:][valid], inside[valid], vocab, 0.7)[0].float()
    bf16_error = (rounded - exact.log_probs[valid]).abs()
    assert bf16_error.max() > 1e-3  # bf16 really rounded
    assert (fused.log_probs[valid] - rounded).abs().max() < bf16_error.max() / 20


@pytest.mark.slow
def test_the_compiled_tiles_give_the_eager_results(small_tiles, monkeypatch, tmp_path):
    """What GPUs run: the per-tile functions compiled (dynamic shapes, no graph break) equal eager ones."""
    monkeypatch.setenv("RLVR_CACHE", str(tmp_path))
    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(40, 16, generator=generator, requires_grad=True)
    weight = torch.randn(SMALL.total_size, 16, generator=generator, requires_grad=True)
    inside = torch.rand(40, generator=generator) < 0.5
    labels = allowed_labels(SMALL, inside, generator)
    results = []
    for mode in ("never", "always"):
        monkeypatch.setattr(head, "COMPILE", mode)
        head._kernels.cache_clear()
        fused = head.constrained_token_logprobs(hidden, weight, None, labels, SMALL, inside, 0.7)
        results.append([*fused, *loss_and_grads(*fused, [hidden, weight], torch.Generator().manual_seed(7))])
    head._kernels.cache_clear()
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_drawable_rows_hold_every_id_some_state_allows(qwen_tok):
    vocab = ReasoningVocab.for_tokenizer(qwen_tok, 151936, QWEN3_N)
    table = vocab.forbidden_table("cpu")
    covered = torch.zeros(vocab.total_size, dtype=torch.bool)
    for start, stop, inside_only in vocab.drawable_rows():
        covered[start:stop] = True
        if inside_only:
            assert table[0, start:stop].all()
    assert table[:, ~covered].all()
    assert ReasoningVocab.for_tokenizer(qwen_tok, 151936, 0).drawable_rows() == ((0, 151669, False),)
