"""The sampling rules and the fast decoder's truncated sampling: top-k and top-p draw from exactly the
distribution Hugging Face's warpers define, under the thought constraint, and confinement holds under them."""

import time

import pytest
import torch
from conftest import bias_towards_forbidden
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rlvr import load_model, thoughts
from rlvr.errors import InputError
from rlvr.generation import prompt_ids
from rlvr.rollout import FastRollout, Rule, choose, in_nucleus, proposals_for, sequence_keys, warp
from rlvr.sampling import Sampling, evaluation_changes, plain_request, training_changes
from rlvr.surgery import ThoughtConstraint
from rlvr.vocab import ReasoningVocab


# --- the rules ----------------------------------------------------------------------------------------------
def test_training_may_sample_only_what_its_loss_scores_and_evaluation_may_also_truncate():
    truncated = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)
    assert training_changes(truncated, 0.6) == ["top_k=20", "top_p=0.95"]
    assert training_changes(GenerationConfig(do_sample=True, temperature=0.7, top_k=0), 1.0) == [
        "temperature=0.7"
    ]
    assert evaluation_changes(truncated) == []
    assert evaluation_changes(GenerationConfig(do_sample=True, top_k=0, min_p=0.1)) == ["min_p=0.1"]
    plain = GenerationConfig(do_sample=True, temperature=0.6, top_k=0, top_p=1.0, max_new_tokens=4)
    assert plain_request(plain, {"input_ids": torch.zeros(1, 1)})
    assert not plain_request(truncated, {"input_ids": torch.zeros(1, 1)})


@pytest.mark.parametrize(
    "sampling, message",
    [
        (Sampling(top_p=0.0), "top_p=0.0 is not in (0, 1]"),
        (Sampling(top_p=1.5), "top_p=1.5 is not in (0, 1]"),
        (Sampling(top_p=float("nan")), "top_p=nan is not in (0, 1]"),
        (Sampling(top_k=-1), "top_k=-1 is negative"),
        (Sampling(temperature=-0.5), "temperature=-0.5 is negative"),
    ],
)
def test_a_sampling_request_out_of_range_is_refused_naming_the_option(sampling, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        sampling.check()


def test_proposals_make_a_stall_rare_for_any_nucleus():
    for top_p in (0.99, 0.95, 0.8, 0.5, 0.2):
        proposals = proposals_for(top_p)
        assert proposals >= 2 and (1 - top_p) ** proposals <= 0.003, top_p


# --- the distribution ---------------------------------------------------------------------------------------
def _hf_warped(logits, vocab: ReasoningVocab, input_ids, sampling: Sampling) -> torch.Tensor:
    processors = LogitsProcessorList(
        [ThoughtConstraint(vocab), TemperatureLogitsWarper(sampling.temperature)]
    )
    if sampling.top_k:
        processors.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1:
        processors.append(TopPLogitsWarper(sampling.top_p))
    return processors(input_ids, logits.clone()).softmax(-1)


def _fast_warped(logits, vocab: ReasoningVocab, inside, sampling: Sampling) -> torch.Tensor:
    """The distribution the fast decoder draws an accepted token from: its warp, restricted to the nucleus
    as `in_nucleus` decides it for every id."""
    rule = Rule.of(sampling)
    warped = warp(logits, inside, vocab.forbidden_table("cpu"), torch.tensor(1 / sampling.temperature), rule)
    logprobs = warped.log_softmax(-1)
    if rule.top_p < 1:
        every = torch.arange(logits.shape[-1]).expand(logits.shape[0], -1)
        logprobs = logprobs.masked_fill(~in_nucleus(logprobs, every, rule.top_p), float("-inf"))
    return logprobs.softmax(-1)


@pytest.mark.parametrize(
    "sampling",
    [Sampling(0.7, top_p=0.9), Sampling(1.0, top_k=20), Sampling(0.6, top_p=0.95, top_k=50)],
    ids=["top_p", "top_k", "both"],
)
def test_the_fast_warp_equals_hugging_faces_warpers_step_by_step(peaked_micro, sampling):
    """Along trajectories the fast decoder sampled (a left-padded batch, prompts of different lengths), the
    distribution it draws each token from equals the one Hugging Face's processors give at that step: the
    thought constraint, temperature, top-k, top-p."""
    model, tokenizer = peaked_micro
    vocab = model.reasoning_vocab
    texts = [[{"role": "user", "content": "What is " + "1+" * i + "1?"}] for i in range(6)]
    prompts = prompt_ids(tokenizer, texts)
    sampled = FastRollout(model, compile=False).sample(
        prompts, sampling, samples=2, max_new_tokens=12, stop_ids=[tokenizer.eos_token_id], pad_id=320, seed=3
    )
    rows = [(p, s.ids) for p, samples in zip(prompts, sampled, strict=True) for s in samples]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, (prompt, completion) in enumerate(rows):
        sequence = prompt + completion
        ids[row, width - len(sequence) :] = torch.tensor(sequence)
        mask[row, width - len(sequence) :] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    compared = 0
    for row, (prompt, completion) in enumerate(rows):
        start = width - len(prompt) - len(completion) + len(prompt)  # index of the first completion token
        constraint_input = ids[row : row + 1, :start]
        inside = thoughts.prompt_state(vocab, constraint_input)
        processors_state = ids[row : row + 1, :start]
        for step in range(len(completion)):
            at = logits[row : row + 1, start + step - 1]
            hf = _hf_warped(at, vocab, processors_state, sampling)
            fast = _fast_warped(at, vocab, inside, sampling)
            torch.testing.assert_close(fast, hf, atol=1e-6, rtol=1e-5)
            token = ids[row : row + 1, start + step]
            assert hf[0, token] > 0  # the decoder drew inside the distribution
            inside = thoughts.advance(vocab, inside, token)
            processors_state = ids[row : row + 1, : start + step + 1]
            compared += 1
    assert compared > 60


@pytest.mark.parametrize(
    "sampling", [Sampling(0.8, top_p=0.7), Sampling(1.0, top_k=3), Sampling(0.5, top_p=0.9, top_k=5)]
)
def test_sampled_frequencies_follow_hugging_faces_warped_distribution(sampling):
    """Accepted draws, over many independent rows, have the frequencies of Hugging Face's warped
    distribution (masked ids, cut ids and ids outside the nucleus never drawn); few draws are not accepted."""
    vocab = ReasoningVocab(
        base_vocab_size=6, tokenizer_size=5, think_start_id=3, think_end_id=4,
        standard_token_ids=(0, 1, 2), control_token_ids=(2, 3, 4),
    )  # fmt: skip
    logits = torch.tensor([0.5, 1.0, 2.0, -1.0, 0.0, 3.0, 0.7, 1.5, 2.5])
    draws = 60_000
    inside = torch.ones(draws, dtype=torch.bool)
    rows = torch.arange(draws)
    tokens, accepted, _ = choose(
        logits.expand(draws, -1).clone(),
        inside,
        vocab.forbidden_table("cpu"),
        torch.tensor(1 / sampling.temperature),
        sequence_keys(11, rows, torch.zeros_like(rows)),
        torch.zeros(draws, dtype=torch.bool),
        Rule.of(sampling),
    )
    expected = _hf_warped(logits[None], vocab, torch.tensor([[3]]), sampling)[0]  # `<think>` opened it
    observed = torch.bincount(tokens[accepted], minlength=9).float() / accepted.sum()
    assert accepted.float().mean() > 0.98
    assert (observed[expected == 0] == 0).all()
    torch.testing.assert_close(observed, expected, atol=0.012, rtol=0)


def _check_confinement(vocab: ReasoningVocab, prompts, sampled) -> int:
    """Assert no reasoning id outside a thought and no never-sampled id; returns reasoning ids inside."""
    table = vocab.forbidden_table("cpu")
    never = table[0] & table[1]
    reasoning_inside = 0
    for prompt, samples in zip(prompts, sampled, strict=True):
        starts = thoughts.prompt_state(vocab, torch.tensor([prompt]))
        for sample in samples:
            ids = torch.tensor([sample.ids])
            before = thoughts.completion_states(vocab, starts, ids)
            reasoning = vocab.is_reasoning(ids)
            assert not (reasoning & ~before).any()
            assert not never[ids].any()
            reasoning_inside += int((reasoning & before).sum())
    return reasoning_inside


@pytest.mark.parametrize("seed", range(8))
def test_confinement_holds_under_top_p_for_left_padded_batches_of_refilled_slots(peaked_micro, seed):
    """Outside a thought no reasoning id; padding rows and control copies never; over seeds, with prompts of
    different lengths through few slots (refilled as sequences end), padding rows and think tags made
    likely by the head's bias."""
    model, tokenizer = peaked_micro
    texts = [[{"role": "user", "content": "1+" * (1 + (i * 5 + seed) % 9) + "1?"}] for i in range(6)]
    prompts = prompt_ids(tokenizer, texts)
    sampled = FastRollout(model, compile=False).sample(
        prompts, Sampling(1.0, top_p=0.9), samples=3, max_new_tokens=24, stop_ids=[322], pad_id=320,
        seed=seed, batch_size=4,
    )  # fmt: skip
    assert _check_confinement(model.reasoning_vocab, prompts, sampled) > 10


def test_confinement_holds_under_top_p_with_qwen3s_vocabulary():
    """The same with Qwen3's tokenizer and N = 151646: padding rows 151669.. and copies of its control
    tokens."""
    model, tokenizer = load_model("tiny-qwen3", reasoning_vocab_size=151646)
    bias_towards_forbidden(model, model.reasoning_vocab)
    texts = [[{"role": "user", "content": "Add " + " and ".join(["7"] * (1 + 4 * i))}] for i in range(3)]
    prompts = prompt_ids(tokenizer, texts)
    sampled = FastRollout(model.eval(), compile=False).sample(
        prompts, Sampling(1.0, top_p=0.9), samples=2, max_new_tokens=8, stop_ids=[151645, 151643],
        pad_id=151643, seed=0, batch_size=4,
    )  # fmt: skip
    assert _check_confinement(model.reasoning_vocab, prompts, sampled) > 5


def test_samples_do_not_depend_on_the_batch_that_draws_them(peaked_micro):
    """Sample j of prompt i draws the noise keyed by (seed, uid i, j): the same completions through 3 slots
    refilled many times, through all at once, and for a prompt drawn alone."""
    model, tokenizer = peaked_micro
    prompts = prompt_ids(tokenizer, [[{"role": "user", "content": "2*" * i + "3?"}] for i in range(5)])
    fast = FastRollout(model, compile=False)
    options = dict(samples=3, max_new_tokens=20, stop_ids=[322], pad_id=320, seed=5)
    few = fast.sample(prompts, Sampling(0.8, top_p=0.9), batch_size=3, **options)
    many = fast.sample(prompts, Sampling(0.8, top_p=0.9), batch_size=15, **options)
    alone = fast.sample(prompts[3:4], Sampling(0.8, top_p=0.9), uids=[3], **options)
    assert [[s.ids for s in p] for p in few] == [[s.ids for s in p] for p in many]
    assert [s.ids for s in alone[0]] == [s.ids for s in few[3]]
    assert len({tuple(s.ids) for p in few for s in p}) > 10  # the samples do differ from each other


def test_the_loop_accounts_for_its_host_time_by_part(peaked_micro):
    """`FastRollout.loop` counts the decode steps and splits the loop's host time: callbacks for ended
    sequences count as reporting (not as waiting for the device), and the parts add up to no more than the
    call's wall time."""
    model, tokenizer = peaked_micro
    prompts = prompt_ids(tokenizer, [[{"role": "user", "content": "2*" * i + "3?"}] for i in range(5)])
    fast = FastRollout(model, compile=False)
    ended = []

    def slow_callback(i, j, sampled):
        time.sleep(0.01)
        ended.append(sampled)

    started = time.perf_counter()
    sampled = fast.sample(
        prompts, Sampling(0.8, top_p=0.9), samples=3, max_new_tokens=20, stop_ids=[322], pad_id=320, seed=5,
        batch_size=3, on_finished=slow_callback,
    )  # fmt: skip
    wall = time.perf_counter() - started
    loop, emitted = fast.loop, sum(s.emitted for p in sampled for s in p)
    assert len(ended) == 15 and emitted > 15
    # the first round (one step on a CPU) is counted apart
    assert emitted / 3 - 1 <= loop.steps <= emitted + 15 * Rule.of(Sampling(0.8, top_p=0.9)).stall_budget(20)
    parts = (loop.first, loop.fill, loop.launch, loop.report, loop.wait)
    assert min(parts) >= 0 and loop.report >= 15 * 0.01 and sum(parts) <= wall
    metrics = loop.metrics("decode")
    assert metrics["decode/steps"] == loop.steps and metrics["decode/report_s"] == loop.report
    assert metrics["decode/ms_per_step"] == pytest.approx(1000 * sum(parts[1:]) / loop.steps)
    before = loop.steps
    fast.sample(prompts[:1], Sampling(0.8), samples=1, max_new_tokens=4, stop_ids=[322], pad_id=320, seed=0)
    assert fast.loop.steps > before  # a later call adds to the same account


def test_one_compiled_step_serves_batches_and_models_of_the_same_shape(monkeypatch):
    """The step compiles without a graph break (CUDA graphs need one graph), once for a cache shape: a second
    model of the same architecture, decoded on the same copy, reuses it, and compiled equals eager."""
    import torch._dynamo.utils

    from rlvr import rollout

    model, tokenizer = load_model("micro", reasoning_vocab_size=325)
    model.eval()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # graphs other tests compiled count here too
    monkeypatch.setattr(
        rollout, "_COMPILED_STEP", torch.compile(rollout._decode_step, backend="eager", fullgraph=True)
    )
    prompts = prompt_ids(tokenizer, [[{"role": "user", "content": "1+" * i + "1?"}] for i in range(4)])
    options = dict(samples=2, max_new_tokens=12, stop_ids=[322], pad_id=320, seed=1, batch_size=3)
    fast = FastRollout(model, compile=True, own_copy=True)
    compiled = fast.sample(prompts, Sampling(0.7, top_p=0.9, top_k=40), **options)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    other, _ = load_model("micro", reasoning_vocab_size=325, seed=1)
    fast.model = other.eval()
    fast.sample(prompts, Sampling(0.7, top_p=0.9, top_k=40), **options)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs == 1
    eager = FastRollout(model, compile=False).sample(prompts, Sampling(0.7, top_p=0.9, top_k=40), **options)
    assert [[s.ids for s in p] for p in compiled] == [[s.ids for s in p] for p in eager]
