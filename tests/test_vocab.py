"""The seven invariants of the reasoning vocabulary, on tiny models with the real Qwen3 tokenizer."""

import itertools
import json
import shutil

import pytest
import torch
from conftest import (
    MAP_FIX,
    MICRO_N,
    QWEN3_N,
    TOKEN_MAP_CHANGES,
    bias_towards_forbidden,
    pickled_weights,
    prompts,
    remote_code,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlvr import ReasoningVocab, ReasoningVocabError, load_model, save_model, thoughts
from rlvr.models import ModelSourceError
from rlvr.surgery import ThoughtConstraint, attach, expand_model, make_faithful
from rlvr.vocab import TOKEN_MAP_FILE

THINK, END_THINK, IM_END = 151667, 151668, 151645


def reference_states(ids: list[int]) -> list[bool]:
    """Inside-a-thought after each position, the slow obvious way."""
    inside, out = False, []
    for token in ids:
        if token == THINK:
            inside = True
        elif token == END_THINK:
            inside = False
        out.append(inside)
    return out


@pytest.fixture(scope="module")
def tiny_reasoning():
    return load_model("tiny-qwen3", reasoning_vocab_size=QWEN3_N)


# --- validation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size, ids, fragment",
    [
        (-1, None, "non-negative"),
        (151670, None, "exceeds the 151669 standard token ids"),
        (2, [5, 151700], "not token ids"),
        (2, [5, 151669], "padding"),
        (3, [5, 6], "has 2 entries"),
        (True, None, "non-negative integer"),
    ],
)
def test_bad_requests_are_refused_with_the_fix(qwen_tok, size, ids, fragment):
    with pytest.raises(ReasoningVocabError, match=fragment):
        ReasoningVocab.for_tokenizer(qwen_tok, 151936, size, ids)


def test_multiplicities_count_repeated_twins(qwen_tok):
    vocab = ReasoningVocab.for_tokenizer(qwen_tok, 151936, 5, [7, 7, 9, 7, 9])
    assert vocab.multiplicities == (1, 2, 1, 3, 2)
    assert vocab.multiplicity_of(151936 + 3) == 3 and vocab.multiplicity_of(7) == 0
    assert vocab.to_standard([1, 151936, 151940]) == [1, 7, 9]


# --- expansion ----------------------------------------------------------------------------------------------
def test_expansion_copies_rows_of_a_tied_qwen3(tiny_reasoning):
    model, _ = tiny_reasoning
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == model.config.vocab_size == 151936 + QWEN3_N
    assert torch.equal(emb[151936:], emb[:QWEN3_N])
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()


def test_expansion_copies_both_matrices_of_an_untied_llama(qwen_tok, tiny_llama_factory):
    model = tiny_llama_factory()
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    twins = [3, 3, 151667, 42]
    vocab = ReasoningVocab.for_tokenizer(qwen_tok, len(qwen_tok), 4, twins)
    expand_model(model, vocab)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.data_ptr() != head.data_ptr()
    assert torch.equal(emb[len(qwen_tok) :], before_in[twins]) and torch.equal(
        head[len(qwen_tok) :], before_out[twins]
    )
    assert torch.equal(emb[: len(qwen_tok)], before_in) and torch.equal(head[: len(qwen_tok)], before_out)
    assert not torch.equal(before_in[twins], before_out[twins])  # the two copies really are distinct


def test_expanding_an_expanded_model_is_refused(tiny_reasoning, qwen_tok, tiny_llama_factory, tmp_path):
    model, tokenizer = tiny_reasoning
    rows = model.get_input_embeddings().weight.shape[0]
    with pytest.raises(ReasoningVocabError, match="already has a reasoning vocabulary of 151646 rows"):
        expand_model(model, ReasoningVocab.for_tokenizer(qwen_tok, rows, 1))
    # loaded without rlvr, its config.json still says so
    plain = AutoModelForCausalLM.from_pretrained(save_model(model, tokenizer, tmp_path / "model"))
    with pytest.raises(ReasoningVocabError, match="already has a reasoning vocabulary of 151646 rows"):
        expand_model(plain, ReasoningVocab.for_tokenizer(qwen_tok, rows, 1))
    with pytest.raises(ReasoningVocabError, match="embedding rows"):  # a map made for another base
        expand_model(tiny_llama_factory(), ReasoningVocab.for_tokenizer(qwen_tok, 151936, 1))


# --- thought state and mask (invariants 2, 3, 5) ------------------------------------------------------------
def test_vectorised_state_matches_the_obvious_scan(tiny_reasoning):
    vocab = tiny_reasoning[0].reasoning_vocab
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (32, 50), generator=generator)
    ids = torch.where(ids == 0, THINK, torch.where(ids == 1, END_THINK, ids + 100))
    states = thoughts.inside_after(vocab, ids, completion_start=0)
    for row, state in zip(ids.tolist(), states.tolist(), strict=True):
        assert state == reference_states(row)
    # the O(1) update reproduces the scan one token at a time
    inside = torch.zeros(32, dtype=torch.bool)
    for t in range(ids.shape[1]):
        inside = thoughts.advance(vocab, inside, ids[:, t])
        assert torch.equal(inside, states[:, t])


def test_forbidden_table_encodes_confinement_and_never_sampled_rows(tiny_reasoning):
    vocab = tiny_reasoning[0].reasoning_vocab
    table = vocab.forbidden_table("cpu")
    outside, inside = table[0], table[1]
    assert not outside[:151669].any() and outside[151669:].all()
    assert inside[151669:151936].all()  # Qwen3's padding rows: no token
    copies = inside[151936:]
    assert (
        copies.sum() == 3 and copies[[151643, 151644, 151645]].all()
    )  # copies of <|endoftext|> <|im_start|> <|im_end|>
    assert not inside[:151669].any()


def test_mask_uses_the_most_negative_finite_value(tiny_reasoning):
    vocab = tiny_reasoning[0].reasoning_vocab
    logits = torch.zeros(2, vocab.total_size, dtype=torch.bfloat16)
    masked = vocab.mask_logits(logits, torch.tensor([False, True]))
    assert torch.isfinite(masked).all()
    assert masked[0, 151936] == torch.finfo(torch.bfloat16).min and masked[1, 151936] == 0


def test_sampling_never_leaves_reasoning_ids_outside_thoughts(tiny_reasoning):
    """A model biased towards forbidden ids: 210 sampled sequences, none of them breaks invariant 2 or 3."""
    model, tokenizer = load_model("tiny-qwen3", reasoning_vocab_size=QWEN3_N)
    vocab = model.reasoning_vocab
    bias_towards_forbidden(model, vocab)
    batch = prompts(tokenizer, 70)
    control_copies = {
        vocab.base_vocab_size + i
        for i, s in enumerate(vocab.standard_token_ids)
        if s in set(vocab.control_token_ids)
    }
    counts = {"reasoning_inside": 0, "closed_thoughts": 0, "sequences": 0}
    for seed in range(3):
        torch.manual_seed(seed)
        out = model.generate(**batch, max_new_tokens=20, do_sample=True, top_k=0, top_p=1.0)
        for row in out.tolist():
            states = reference_states(row)
            prompt_len = batch["input_ids"].shape[1]
            for position in range(prompt_len, len(row)):
                token, inside_before = row[position], states[position - 1]
                assert not (151669 <= token < 151936), "a padding row was sampled"
                assert token not in control_copies, "a copy of a control token was sampled"
                if token >= vocab.base_vocab_size:
                    assert inside_before, "a reasoning id was sampled outside a thought"
                    counts["reasoning_inside"] += 1
            counts["closed_thoughts"] += sum(
                row[p] == END_THINK and states[p - 1] for p in range(prompt_len, len(row))
            )
            counts["sequences"] += 1
    assert counts["sequences"] == 210
    assert counts["closed_thoughts"] > 30 and counts["reasoning_inside"] > 1000  # the bias really pushed


def test_constraint_costs_one_scan_then_one_token_per_step(tiny_reasoning, monkeypatch):
    """Invariant 5: the prompt is scanned once, each later step reads only the newest id (no re-decoding)."""
    model, tokenizer = tiny_reasoning
    scans, advances = [], []
    scan, advance = thoughts.inside_after, thoughts.advance
    monkeypatch.setattr(
        thoughts, "inside_after", lambda tags, ids, *a: scans.append(ids.shape) or scan(tags, ids, *a)
    )
    monkeypatch.setattr(
        thoughts,
        "advance",
        lambda tags, inside, new: advances.append(new.shape) or advance(tags, inside, new),
    )
    monkeypatch.setattr(type(tokenizer), "_decode", lambda *a, **k: pytest.fail("decoded during generation"))
    batch = prompts(tokenizer, 4)
    model.generate(**batch, max_new_tokens=12, min_new_tokens=12, do_sample=True)
    assert scans == [batch["input_ids"].shape]
    assert len(advances) == 11 and all(shape == (4,) for shape in advances)


# --- one distribution (invariant 4) -------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_time_logprobs_equal_training_time_logprobs(temperature):
    model, tokenizer = load_model("tiny-qwen3", reasoning_vocab_size=QWEN3_N)
    vocab = model.reasoning_vocab
    bias_towards_forbidden(model, vocab)
    attach(model, vocab, temperature=temperature)
    batch = prompts(tokenizer, 6)
    torch.manual_seed(0)
    out = model.generate(
        **batch,
        max_new_tokens=24,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=temperature,
        output_scores=True,
        return_dict_in_generate=True,
    )
    prompt_len = batch["input_ids"].shape[1]
    completion = out.sequences[:, prompt_len:]
    # float64: torch's fp32 CPU log_softmax drops the many tiny terms of a 300k-wide sum (~1e-4 error)
    generated = torch.stack([torch.log_softmax(s.double(), -1) for s in out.scores], 1).float()
    generated = generated.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    attention = torch.cat([batch["attention_mask"], torch.ones_like(completion)], 1)
    labels = out.sequences.masked_fill(attention == 0, -100)
    labels[:, :prompt_len] = -100
    trained = model(input_ids=out.sequences, attention_mask=attention, labels=labels, fused_lm_head=True)
    training = trained.log_probs[:, prompt_len - 1 :]
    assert torch.isfinite(generated).all()
    torch.testing.assert_close(training, generated, atol=2e-5, rtol=1e-5)
    assert torch.isfinite(trained.entropy).all()
    assert (completion >= vocab.base_vocab_size).any()  # reasoning ids were scored, not only standard ones


def test_recorded_sampling_logprobs_are_as_precise_as_float64():
    """The HF path's record of each sampled token's log-prob (for the importance ratio) is normalised as
    precisely as the loss's: within 1e-6 of float64 over the 303k-wide masked distribution."""
    model, tokenizer = load_model("tiny-qwen3", reasoning_vocab_size=QWEN3_N)
    bias_towards_forbidden(model, model.reasoning_vocab)
    model.record_sampling_logprobs = True
    batch = prompts(tokenizer, 4)
    torch.manual_seed(0)
    out = model.generate(
        **batch, max_new_tokens=12, do_sample=True, top_k=0, top_p=1.0,
        output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    completion = out.sequences[:, batch["input_ids"].shape[1] :]
    exact = torch.stack([torch.log_softmax(s.double(), -1) for s in out.scores], 1)
    exact = exact.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(model.sampling_logprobs.double(), exact, atol=1e-6, rtol=0)


def test_training_logprobs_have_finite_gradients():
    model, _ = load_model("tiny-qwen3", reasoning_vocab_size=QWEN3_N)
    bias_towards_forbidden(model, model.reasoning_vocab)
    ids = torch.tensor([[1, 2, THINK, 151936 + 5, 7, END_THINK, 9, IM_END]])
    labels = ids.clone()
    labels[:, :2] = -100
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
    (out.log_probs.sum() + out.entropy.sum()).backward()
    grad = model.get_output_embeddings().weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert grad[151669:151936].abs().max() == 0  # padding rows: probability exactly 0, no gradient


# --- same path for both arms (invariant 1) ------------------------------------------------------------------
def test_baseline_takes_the_same_path_and_equals_a_plain_model(qwen_tok, tiny_llama_factory):
    plain = tiny_llama_factory(seed=3)
    constrained = tiny_llama_factory(seed=3)
    vocab = ReasoningVocab.for_tokenizer(qwen_tok, len(qwen_tok), 0)
    expand_model(constrained, vocab)
    # the constrained path is active: generate builds its processors through the instance hook, with the mask
    # first
    processors = constrained._get_logits_processor(constrained.generation_config, 0)
    assert "_get_logits_processor" in vars(constrained) and isinstance(processors[0], ThoughtConstraint)
    batch = prompts(qwen_tok, 3)
    outputs = []
    for model in (plain, constrained):
        torch.manual_seed(7)
        outputs.append(model.generate(**batch, max_new_tokens=16, do_sample=True, top_k=0))
    assert torch.equal(outputs[0], outputs[1])
    ids = outputs[0]
    labels = ids.masked_fill(
        torch.cat([batch["attention_mask"], torch.ones_like(ids[:, batch["input_ids"].shape[1] :])], 1) == 0,
        -100,
    )
    logits = plain(input_ids=ids, attention_mask=(labels != -100).long()).logits[:, :-1]
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    got = constrained(
        input_ids=ids, attention_mask=(labels != -100).long(), labels=labels, fused_lm_head=True
    )
    valid = labels[:, 1:] != -100
    torch.testing.assert_close(got.log_probs[valid], expected[valid], atol=1e-5, rtol=1e-5)


# --- faithful decoding (invariant 6) ------------------------------------------------------------------------
def test_batch_decode_renders_reasoning_ids_as_their_twins(qwen_tok):
    vocab = ReasoningVocab.for_tokenizer(qwen_tok, 151936, QWEN3_N)
    tokenizer = make_faithful(qwen_tok.__class__.from_pretrained(qwen_tok.name_or_path), vocab)
    standard = tokenizer.encode("<think>Let x = 12, so 2x = 24.</think> The answer is \\boxed{24}.")
    start, end = standard.index(THINK), standard.index(END_THINK)
    mixed = [i + 151936 if start < k < end and k % 2 else i for k, i in enumerate(standard)]
    assert mixed != standard
    text = tokenizer.batch_decode([mixed, standard], skip_special_tokens=True)
    assert text[0] == text[1] == "<think>Let x = 12, so 2x = 24.</think> The answer is \\boxed{24}."
    assert tokenizer.convert_ids_to_tokens(mixed) == tokenizer.convert_ids_to_tokens(standard)


def test_decode_with_spans_marks_each_token_and_its_multiplicity(qwen_tok):
    x, y = qwen_tok.encode(" x")[0], qwen_tok.encode(" y")[0]
    vocab = ReasoningVocab.for_tokenizer(qwen_tok, 151936, 3, [x, x, y])
    tokenizer = make_faithful(qwen_tok.__class__.from_pretrained(qwen_tok.name_or_path), vocab)
    emoji = qwen_tok.encode("🫠")
    assert len(emoji) > 1  # one character over several byte tokens
    ids = qwen_tok.encode("<think>a") + [151936, 151937] + emoji + [151938] + qwen_tok.encode("</think>b")
    text, spans = tokenizer.decode_with_spans(ids)
    assert text == tokenizer.decode(ids) == "<think>a x x🫠 y</think>b"
    assert len(spans) == len(ids)
    pieces = [(text[s.start : s.end], s.multiplicity) for s in spans]
    assert pieces[2:4] == [(" x", 1), (" x", 2)]
    assert pieces[4 : 4 + len(emoji)] == [("", 0)] * (len(emoji) - 1) + [
        ("🫠", 0)
    ]  # credited to the last byte
    assert pieces[4 + len(emoji)] == (" y", 1)
    assert "".join(piece for piece, _ in pieces) == text
    assert all(a.end == b.start for a, b in itertools.pairwise(spans))


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decode_with_spans_returns_decodes_text_for_completions_cut_inside_a_character(
    qwen_tok, skip_special_tokens
):
    """A completion cut by the length limit inside a multi-byte character: `decode` shows U+FFFD there, and
    the spans, the served completion and the pages show the same text."""
    vocab = ReasoningVocab.for_tokenizer(qwen_tok, 151936, QWEN3_N)
    tokenizer = make_faithful(qwen_tok.__class__.from_pretrained(qwen_tok.name_or_path), vocab)
    ids = tokenizer.encode("<think>é 🫠 中文 x</think> 🫠\\boxed{Ω}<|im_end|>", add_special_tokens=False)
    ids = [i + 151936 if 0 < k < 8 else i for k, i in enumerate(ids)]  # some as reasoning ids
    cut_inside = 0
    for length in range(len(ids) + 1):
        prefix = ids[:length]
        expected = tokenizer.decode(prefix, skip_special_tokens=skip_special_tokens)
        text, spans = tokenizer.decode_with_spans(prefix, skip_special_tokens=skip_special_tokens)
        assert text == expected, length
        assert len(spans) == length and "".join(text[s.start : s.end] for s in spans) == text
        assert all(a.end == b.start for a, b in itertools.pairwise(spans))
        cut_inside += expected.endswith("\ufffd")
    assert cut_inside >= 3  # the emoji twice and a CJK character were cut


# --- round trip (invariant 7) -------------------------------------------------------------------------------
def test_save_and_load_restore_the_constraint_and_identical_logits(tmp_path, tiny_reasoning):
    model, tokenizer = tiny_reasoning
    directory = save_model(model, tokenizer, tmp_path / "model")
    files = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", TOKEN_MAP_FILE, "tokenizer.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    saved = json.loads((directory / TOKEN_MAP_FILE).read_text())
    assert saved["standard_token_ids"][:3] == [0, 1, 2] and saved["multiplicities"][:3] == [1, 1, 1]
    assert json.loads((directory / "config.json").read_text())["vocab_size"] == 151936 + QWEN3_N
    assert "model.embed_tokens.weight" in load_file(directory / "model.safetensors")

    loaded, loaded_tok = load_model(str(directory))
    assert loaded.reasoning_vocab == model.reasoning_vocab
    ids = torch.tensor([tokenizer.encode("<think>1+1=2</think> \\boxed{2}")])
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded_tok.decode([151936 + 16]) == tokenizer.decode([16]) == "1"
    # a standard Hugging Face directory: plain transformers loads it too
    assert AutoModelForCausalLM.from_pretrained(directory).config.vocab_size == 151936 + QWEN3_N


def test_loading_with_a_conflicting_size_is_refused(tmp_path, tiny_reasoning):
    directory = save_model(*tiny_reasoning, tmp_path / "model")
    with pytest.raises(ReasoningVocabError, match="already has a reasoning vocabulary of 151646 rows"):
        load_model(str(directory), reasoning_vocab_size=8)


def test_a_corrupt_token_map_is_a_clear_error(tmp_path, tiny_reasoning):
    directory = save_model(*tiny_reasoning, tmp_path / "model")
    (directory / TOKEN_MAP_FILE).write_text("{not json")
    with pytest.raises(ReasoningVocabError, match="not a readable reasoning token map"):
        load_model(str(directory))


@pytest.fixture(scope="module")
def micro_reasoning_dir(tmp_path_factory):
    model, tokenizer = load_model("micro", reasoning_vocab_size=MICRO_N)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("micro") / "model")


@pytest.mark.parametrize("change", TOKEN_MAP_CHANGES)
def test_a_map_that_contradicts_its_model_or_is_missing_is_refused_in_one_line(
    micro_reasoning_dir, tmp_path, change
):
    """Loaded anyway, each of these would sample what the true map forbids or never sample trained rows:
    padding rows that become sampleable, swapped thought tags, a copy of <|im_end|> allowed inside a thought,
    the 325 reasoning rows read as padding, or a second expansion to 1034 rows."""
    directory = shutil.copytree(micro_reasoning_dir, tmp_path / change)
    alter, names = TOKEN_MAP_CHANGES[change]
    alter(directory)
    for size in (None, MICRO_N):  # as saved, and asking for the size it was trained with
        with pytest.raises(ReasoningVocabError) as caught:
            load_model(str(directory), reasoning_vocab_size=size)
        message = str(caught.value)
        assert "\n" not in message and names in message and MAP_FIX in message, message
        assert str(directory) in message, message
    assert not (directory / "ran").exists()


def test_the_saved_map_and_config_record_the_expansion(micro_reasoning_dir):
    config = json.loads((micro_reasoning_dir / "config.json").read_text())
    assert (config["rlvr_reasoning_vocab_size"], config["rlvr_base_vocab_size"], config["vocab_size"]) == (
        MICRO_N, 384, 384 + MICRO_N)  # fmt: skip
    model, tokenizer = load_model(str(micro_reasoning_dir))
    assert model.reasoning_vocab == load_model("micro", reasoning_vocab_size=MICRO_N)[0].reasoning_vocab
    baseline = save_model(*load_model("micro"), micro_reasoning_dir.parent / "baseline")
    assert json.loads((baseline / "config.json").read_text())["rlvr_reasoning_vocab_size"] == 0
    (baseline / TOKEN_MAP_FILE).unlink()  # a baseline's map holds nothing it cannot rebuild
    assert load_model(str(baseline), reasoning_vocab_size=4)[0].reasoning_vocab.size == 4


def test_a_map_is_checked_against_the_tokenizer_it_is_attached_to(qwen_tok):
    from rlvr.presets.task import micro_tokenizer

    vocab = ReasoningVocab.for_tokenizer(qwen_tok, 151936, 8)
    vocab.check_tokenizer(qwen_tok)
    with pytest.raises(ReasoningVocabError, match="tokenizer_size is 151669, but the tokenizer has 325 ids"):
        vocab.check_tokenizer(micro_tokenizer())
    with pytest.raises(ReasoningVocabError, match="think_end_id is 151669, not a token id"):
        ReasoningVocab(151936, 151669, THINK, 151669, (1, 2), (THINK, END_THINK))
    with pytest.raises(ReasoningVocabError, match="embedding rows but the token map.s base_vocab_size"):
        attach(load_model("tiny-qwen3")[0], vocab)


@pytest.mark.parametrize("unsafe", [pickled_weights, remote_code], ids=["pickled-weights", "auto-map"])
def test_loading_never_runs_code_from_the_model(micro_reasoning_dir, tmp_path, unsafe):
    directory = shutil.copytree(micro_reasoning_dir, tmp_path / "model")
    unsafe(directory)
    with pytest.raises(ModelSourceError) as caught:
        load_model(str(directory))
    message = str(caught.value)
    assert "\n" not in message and str(directory) in message
    assert ("pytorch_model.bin" in message and "safetensors only" in message) or (
        "auto_map" in message and "runs no code" in message
    ), message
    assert not (directory / "ran").exists()


def test_an_unknown_model_is_a_clear_error():
    with pytest.raises(ModelSourceError, match="not a preset"):
        load_model("no-such-org/no-such-model-xyz")


def test_thought_constraint_rescans_under_beam_search(tiny_reasoning):
    model, _ = tiny_reasoning
    processors = model._get_logits_processor(model.generation_config.__class__(num_beams=2), 0)
    assert isinstance(processors[0], ThoughtConstraint) and processors[0].rescan_every_step


def test_a_model_that_transforms_its_logits_is_refused_by_one_forward(qwen_tok):
    """No list of config names: a Granite-style logit divisor is caught because the logits differ from the
    head's."""
    from transformers import GraniteConfig, GraniteForCausalLM

    def granite(scaling: float):
        config = GraniteConfig(
            vocab_size=len(qwen_tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            logits_scaling=scaling,
        )
        torch.manual_seed(0)
        return GraniteForCausalLM(config).eval()

    vocab = ReasoningVocab.for_tokenizer(qwen_tok, len(qwen_tok), 2)
    with pytest.raises(ReasoningVocabError, match="transforms its logits"):
        expand_model(granite(4.0), vocab)
    expand_model(granite(1.0), vocab)  # the same model without the divisor is a plain head


def test_cast_lm_head_to_fp32_runs_the_constrained_head_in_fp32_under_bf16_autocast():
    model, _ = load_model("tiny-qwen3", reasoning_vocab_size=QWEN3_N)
    vocab = model.reasoning_vocab
    ids = torch.tensor([[151644, 872, 198, THINK, 17, 151936 + 18, END_THINK, 19, IM_END]])
    labels = ids.clone()
    labels[:, :3] = -100
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "fused_lm_head": True,
    }
    inside = torch.tensor(
        [False, False, False, True, True, True, False, False]
    )  # the state before tokens 1..8
    errors = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.base_model(input_ids=ids).last_hidden_state[
            0, :-1
        ]  # the body in bf16, as training runs it
        logits = hidden.double() @ model.get_output_embeddings().weight.double().T
        expected = (
            torch.log_softmax(vocab.mask_logits(logits, inside), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        )
        for head_fp32 in (False, True):
            attach(model, vocab, head_fp32=head_fp32)
            errors[head_fp32] = (model(**kwargs).log_probs[0, 2:] - expected[2:]).abs().max().item()
    assert errors[True] < 1e-4 < errors[False]  # the head itself adds no bf16 rounding when cast to fp32


def test_the_faithful_tokenizer_pickles(qwen_tok):
    import pickle

    vocab = ReasoningVocab.for_tokenizer(qwen_tok, 151936, QWEN3_N)
    tokenizer = make_faithful(qwen_tok.__class__.from_pretrained(qwen_tok.name_or_path), vocab)
    ids = [151936 + i for i in tokenizer.encode("6*7=42", add_special_tokens=False)]
    restored = pickle.loads(pickle.dumps(tokenizer))
    assert type(restored).__name__ == type(tokenizer).__name__ and restored.reasoning_vocab == vocab
    assert restored.decode(ids) == tokenizer.decode(ids) == "6*7=42"
    assert restored.decode_with_spans(ids)[1] == tokenizer.decode_with_spans(ids)[1]
