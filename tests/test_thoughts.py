"""One thought structure, read from ids, shared by the sampler, the loss, rewards, metrics and evaluation."""

import pytest
import torch
from conftest import END_THINK, MICRO_N, QWEN3_N, THINK, bias_towards_forbidden

from rlvr import load_model, thoughts
from rlvr.generation import describe
from rlvr.presets.qwen3 import CHATML_TEMPLATE
from rlvr.thoughts import until_stop
from rlvr.vocab import ReasoningVocab

# ChatML whose generation prompt opens the thought, as reasoning models' templates do
OPENING_TEMPLATE = CHATML_TEMPLATE.replace(
    "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'"
)
STOPS = [151645, 151643]


@pytest.fixture(scope="module")
def vocab(qwen_tok):
    return ReasoningVocab.for_tokenizer(qwen_tok, 151936, QWEN3_N)


def render(tokenizer, user: str, template: str | None = None, system: str | None = None, **kwargs) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, chat_template=template, **kwargs
    )


def prompt_ids(tokenizer, texts: list[str]) -> dict:
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_the_thought_state_starts_at_the_assistant_turn(qwen_tok, vocab):
    texts = [
        render(qwen_tok, "What is 2+2?"),
        render(qwen_tok, "Say <think> and what is 2+2?"),  # a literal tag in user text
        render(qwen_tok, "What is 1+1? <think>", system="You think in <think> tags"),
        render(qwen_tok, "What is 2+2?", template=OPENING_TEMPLATE),  # the template opens the thought
        render(qwen_tok, "Tell me about <think>", template=OPENING_TEMPLATE),
        render(
            qwen_tok, "What is 2+2?", enable_thinking=False
        ),  # the template opens and closes an empty thought
    ]
    batch = prompt_ids(qwen_tok, texts)
    assert (batch["input_ids"][1] == THINK).any()  # the literal tag is the tag's id
    states = thoughts.prompt_state(vocab, batch["input_ids"]).tolist()
    assert states == [False, False, False, True, True, False]


@pytest.mark.parametrize(
    "parts, starts_inside, in_thought, answer, closed",
    [
        # parts: ids as "<"/">" for the tags, "r" for a reasoning id, "a" for any other token
        ("<aa>aa", False, "TTTTFF", (4, 6), True),
        ("aa<a>a", False, "FFTTTF", (5, 6), True),
        ("<a>a<a", False, "TTTFTT", None, False),  # re-opened and never closed: no answer
        ("<ara", False, "TTTT", None, False),
        ("aa>aa", True, "TTTFF", (3, 5), True),  # the template opened the thought
        ("aa>aa", False, "FFFFF", (0, 5), False),  # a close while outside changes nothing: no thought at all
        ("aaa", False, "FFF", (0, 3), False),
        ("", True, "", None, False),
    ],
)
def test_structure_of_a_completion(vocab, parts, starts_inside, in_thought, answer, closed):
    code = {"<": THINK, ">": END_THINK, "r": vocab.base_vocab_size + 7, "a": 100}
    ids = [code[c] for c in parts]
    structure = thoughts.structure(vocab, ids, starts_inside)
    assert "".join("T" if t else "F" for t in structure.in_thought) == in_thought
    assert (None if structure.answer is None else (structure.answer.start, structure.answer.stop)) == answer
    assert structure.closed is closed
    assert structure.reasoning_in_thought == parts.count("r")


def test_batch_counts_agree_with_each_completions_structure(vocab):
    """The vectorised counts of a padded batch (stop tokens and padding in it, as TRL's trainer hands it over)
    equal the counts of each completion's structure, read up to its stop token."""
    generator = torch.Generator().manual_seed(1)
    completions = torch.randint(0, 7, (60, 12), generator=generator)
    code = {0: THINK, 1: END_THINK, 4: vocab.base_vocab_size + 3, 5: STOPS[0], 6: STOPS[1]}
    completions = torch.tensor([[code.get(i, i + 100) for i in row] for row in completions.tolist()])
    lengths = torch.randint(0, 13, (60,), generator=generator)
    mask = torch.arange(12).expand(60, -1) < lengths.unsqueeze(1)
    prompts = torch.full((60, 3), 200)
    prompts[::2, -1] = THINK  # half the prompts end inside a thought
    before = thoughts.completion_states(vocab, thoughts.prompt_state(vocab, prompts), completions)
    counted = thoughts.Counts(*thoughts.batch_counts(vocab, before, completions, mask.long(), STOPS).tolist())
    structures = [
        thoughts.structure(vocab, until_stop(row[:n].tolist(), STOPS), i % 2 == 0)
        for i, (row, n) in enumerate(zip(completions, lengths, strict=True))
    ]
    assert counted == thoughts.Counts.of(structures)
    assert counted.answer_tokens > 0 and counted.closed > 0 and counted.reasoning_tokens > 0
    cut = [len(until_stop(row[:n].tolist(), STOPS)) < n for row, n in zip(completions, lengths, strict=True)]
    assert sum(cut) > 10  # many completions hold a stop token, which is counted as neither


def sample_with_recorded_logprobs(model, tokenizer, texts: list[str], seed: int = 0):
    """Sample with the model's own generate, keeping each token's sampling-time log-prob; then score the same
    sequences as TRL's trainer does (left-padded prompt, completion labels only, `fused_lm_head=True`)."""
    batch = prompt_ids(tokenizer, texts)
    model.record_sampling_logprobs = True
    torch.manual_seed(seed)
    out = model.generate(
        **batch,
        max_new_tokens=20,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=model.reasoning_temperature,
        eos_token_id=STOPS,
        pad_token_id=151643,
    )
    sampled = model.sampling_logprobs
    start = batch["input_ids"].shape[1]
    completion = out[:, start:]
    live = ~(
        torch.cumsum(torch.isin(completion, torch.tensor(STOPS)), 1)
        - torch.isin(completion, torch.tensor(STOPS)).long()
    ).bool()
    attention = torch.cat([batch["attention_mask"], live.long()], 1)
    labels = out.masked_fill(attention == 0, -100)
    labels[:, :start] = -100
    with torch.no_grad():
        trained = model(input_ids=out, attention_mask=attention, labels=labels, fused_lm_head=True)
    return batch, completion, live, sampled, trained.log_probs[:, start - 1 :]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_time_logprobs_equal_training_time_logprobs_token_by_token(qwen_tok, temperature):
    """Invariant 4 with left padding, prompts of different lengths, a template that opens the thought and a
    literal <think> in user text: the loss scores exactly the distribution each token was drawn from."""
    model, tokenizer = load_model("tiny-qwen3", reasoning_vocab_size=QWEN3_N)
    vocab = model.reasoning_vocab
    bias_towards_forbidden(model, vocab)
    bias = model.get_output_embeddings().bias
    bias.data[THINK], bias.data[END_THINK] = (
        15.0,
        18.0,
    )  # inside a thought, reasoning ids now outweigh both tags
    model.reasoning_temperature = temperature
    texts = [
        render(tokenizer, "What is 2+2?"),
        render(tokenizer, "Please, what is the sum of 12 and 30, and why?", template=OPENING_TEMPLATE),
        render(tokenizer, "Say <think> then stop."),
        render(tokenizer, "1+1?"),
    ] * 6
    batch, completion, live, sampled, trained = sample_with_recorded_logprobs(model, tokenizer, texts)
    assert (batch["attention_mask"] == 0).any()
    torch.testing.assert_close(trained[live], sampled[live], atol=5e-4, rtol=1e-4)
    starts = thoughts.prompt_state(vocab, batch["input_ids"])
    assert starts.tolist() == [False, True, False, False] * 6
    reasoning = completion >= vocab.base_vocab_size
    assert not reasoning[:, 0][starts.logical_not()].any()  # no thought is open at the first step of these
    before = thoughts.completion_states(vocab, starts, completion)
    assert not (reasoning & ~before & live).any()  # confinement, template-opened thoughts included
    assert reasoning[1::4, 0].any()  # the template-opened thought lets the first token be a reasoning id


def test_a_literal_think_in_user_text_does_not_open_a_thought_for_sampling():
    model, tokenizer = load_model("tiny-qwen3", reasoning_vocab_size=QWEN3_N)
    vocab = model.reasoning_vocab
    bias_towards_forbidden(model, vocab)
    texts = [render(tokenizer, f"Repeat <think> {i} times") for i in range(24)]
    texts += [render(tokenizer, "hi", system=f"Open with <think> {i}") for i in range(24)]
    batch = prompt_ids(tokenizer, texts)
    torch.manual_seed(0)
    first = model.generate(**batch, max_new_tokens=1, do_sample=True, top_k=0, pad_token_id=151643)[:, -1]
    assert not (first >= vocab.base_vocab_size).any()
    assert (first == THINK).sum() > 10  # the bias makes a thought likely: the model opens it itself


def test_baseline_on_a_qwen3_shaped_model_never_samples_padding_rows_and_scores_what_it_samples():
    """N = 0 with Qwen3's padding rows (151,669 ids, 151,936 rows): the rows that are no token are masked in
    sampling and in the loss alike, even when they are the likeliest ids."""
    model, tokenizer = load_model("tiny-qwen3", reasoning_vocab_size=0)
    vocab = model.reasoning_vocab
    assert (vocab.tokenizer_size, vocab.total_size) == (151669, 151936)
    bias_towards_forbidden(model, vocab)  # padding rows are now the likeliest by far
    texts = [render(tokenizer, f"What is {i}+{i}?") for i in range(8)]
    _, completion, live, sampled, trained = sample_with_recorded_logprobs(model, tokenizer, texts)
    assert not ((completion >= vocab.tokenizer_size) & live).any()
    torch.testing.assert_close(trained[live], sampled[live], atol=5e-4, rtol=1e-4)
    plain = torch.log_softmax(type(model).forward(model, input_ids=completion[:, :1]).logits.float(), -1)
    assert plain[..., vocab.tokenizer_size :].exp().sum() > 0.5  # unmasked, the padding rows would be sampled


def test_describe_reads_the_structure_the_sampler_used(qwen_tok, vocab):
    from rlvr.presets.qwen3 import qwen3_tokenizer
    from rlvr.surgery import make_faithful

    tokenizer = make_faithful(qwen3_tokenizer(), vocab)
    spelled = tokenizer.encode("</", add_special_tokens=False) + tokenizer.encode(
        "think>", add_special_tokens=False
    )
    ids = [
        THINK,
        *tokenizer.encode("6*7=42", add_special_tokens=False),
        *spelled,
        *[vocab.base_vocab_size + i for i in tokenizer.encode(" \\boxed{42}", add_special_tokens=False)],
    ]
    sample = describe(until_stop(ids, STOPS), tokenizer, vocab)
    assert sample.text == "<think>6*7=42</think> \\boxed{42}"
    assert (sample.closed, sample.answer, sample.well_formed) == (False, "", False)
    assert sample.thought_tokens == len(ids) and sample.answer_tokens == 0
    opened = describe(
        tokenizer.encode("2+2=4</think> \\boxed{4}", add_special_tokens=False),
        tokenizer,
        vocab,
        starts_in_thought=True,
    )
    assert (opened.closed, opened.answer, opened.well_formed, opened.thought) == (
        True,
        "\\boxed{4}",
        True,
        "2+2=4",
    )


def test_training_metrics_equal_evaluation_metrics_on_the_same_completions(tmp_path):
    """One counting of thought, answer and EOS: the `reasoning/*` numbers GRPO logs for a rollout are the
    numbers evaluation reports for the same completions, the EOS being neither thought nor answer in both."""
    from rlvr.dataset import load_split
    from rlvr.evaluation import dataset_metrics, score_problem
    from rlvr.generation import stop_token_ids
    from rlvr.grpo import ReasoningGRPOTrainer, TrainSettings, _prompt_dataset, grpo_config
    from rlvr.preprocess import Options, preprocess
    from rlvr.rewards import reward_functions

    preprocess("synthetic:count=8", tmp_path / "data", Options(test_size=0, instruction=""))
    model, tokenizer = load_model("micro", reasoning_vocab_size=MICRO_N)
    vocab = model.reasoning_vocab
    head = model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[vocab.base_vocab_size :] = 1.0  # reasoning ids likely inside a thought
    bias[[vocab.think_start_id, vocab.think_end_id, tokenizer.eos_token_id]] = torch.tensor([5.5, 5.0, 3.5])
    head.bias = torch.nn.Parameter(bias)
    settings = TrainSettings(
        model="micro", output_dir=str(tmp_path / "out"), per_device_train_batch_size=16,
        gradient_accumulation_steps=1, num_generations=4, max_completion_length=16, max_steps=1,
    )  # fmt: skip
    dataset, _ = _prompt_dataset(load_split(str(tmp_path / "data"), "train").frame, tokenizer, 512)
    trainer = ReasoningGRPOTrainer(
        model=model, args=grpo_config(settings, {}), train_dataset=dataset, processing_class=tokenizer,
        reward_funcs=reward_functions(tokenizer),
    )  # fmt: skip
    trainer.model.train()
    batch = [dataset[i] for i in range(4) for _ in range(4)]  # 4 prompts x 4 completions, as TRL groups them
    torch.manual_seed(0)
    output = trainer._generate_and_score_completions(batch)
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    stops = stop_token_ids(model, tokenizer)
    starts = thoughts.prompt_state(vocab, output["prompt_ids"]).tolist()
    rows = zip(output["completion_ids"], output["completion_mask"].bool(), starts, strict=True)
    generated = [
        describe(until_stop(ids[mask].tolist(), stops), tokenizer, vocab, s) for ids, mask, s in rows
    ]
    problems = [
        score_problem(generated[i : i + 4], [False] * 4, batch[i]["solution"]) for i in range(0, 16, 4)
    ]
    evaluated = dataset_metrics(problems, ks=[1])

    assert logged["reasoning/thought_length"] == evaluated["thought_length"]
    assert logged["reasoning/answer_length"] == evaluated["answer_length"]
    assert logged["reasoning/token_share"] == evaluated["reasoning_share"]
    assert logged["reasoning/closed_thought_rate"] == sum(g.closed for g in generated) / len(generated)
    # the completions hold everything that could be counted twice or not at all
    ended = [bool(torch.isin(ids[mask], torch.tensor(stops)).any()) for ids, mask in
             zip(output["completion_ids"], output["completion_mask"].bool(), strict=True)]  # fmt: skip
    assert sum(ended) >= 3 and 0 < sum(g.closed for g in generated) < 16
    assert evaluated["answer_length"] > 0 and evaluated["reasoning_share"] > 0
    assert any(g.structure.answer is None for g in generated) and any(
        g.structure.prefix.stop for g in generated
    )
