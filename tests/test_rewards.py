"""Rewards read the thought from token ids, as the sampler does, and judge only the answer after it."""

import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlvr import answers
from rlvr.answers import final_number
from rlvr.errors import InputError
from rlvr.grpo import TrainSettings, chosen_rewards, grpo_config
from rlvr.presets.qwen3 import qwen3_tokenizer
from rlvr.rewards import answer_is_correct, lenient_is_correct, parse_rewards, reward_functions
from rlvr.surgery import make_faithful
from rlvr.vocab import ReasoningVocab

N = 151646  # reasoning row E + i is a copy of standard id i


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = qwen3_tokenizer()
    return make_faithful(tokenizer, ReasoningVocab.for_tokenizer(tokenizer, 151936, N))


def encode(tokenizer, text: str) -> list[int]:
    """Text to ids; the strings <think> and </think> become the tag ids, as the tokenizer reads them."""
    return tokenizer.encode(text, add_special_tokens=False)


def as_reasoning(tokenizer, text: str) -> list[int]:
    return [tokenizer.reasoning_vocab.base_vocab_size + i for i in encode(tokenizer, text)]


def spelled_close(tokenizer) -> list[int]:
    """`</think>` written with three ordinary tokens: it decodes like the tag but is not the tag's id."""
    ids = encode(tokenizer, "</") + encode(tokenizer, "think") + encode(tokenizer, ">")
    assert tokenizer.decode(ids) == "</think>" and tokenizer.reasoning_vocab.think_end_id not in ids
    return ids


def score(tokenizer, completion_ids, solutions, starts_in_thought=None):
    """Both rewards, called as TRL's GRPOTrainer calls them (decoded text, ids, dataset columns, state)."""
    accuracy, format_ = reward_functions(tokenizer)
    assert (accuracy.__name__, format_.__name__) == ("accuracy_reward", "format_reward")
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    kwargs = {
        "prompts": [[{"role": "user", "content": "q"}]] * len(texts),
        "completions": [[{"role": "assistant", "content": t}] for t in texts],
        "completion_ids": completion_ids,
        "trainer_state": None,
        "log_extra": None,
        "log_metric": None,
    }
    if starts_in_thought is not None:
        kwargs["starts_in_thought"] = starts_in_thought
    return accuracy(solution=solutions, **kwargs), format_(**kwargs)


def test_a_spelled_out_close_tag_closes_nothing_so_an_answer_after_it_earns_nothing(tokenizer):
    think = [tokenizer.reasoning_vocab.think_start_id]
    in_reasoning_ids = (
        think
        + encode(tokenizer, "6*7=42")
        + spelled_close(tokenizer)
        + as_reasoning(tokenizer, " \\boxed{42}")
    )
    in_standard_ids = (
        think + encode(tokenizer, "6*7=42") + spelled_close(tokenizer) + encode(tokenizer, " \\boxed{42}")
    )
    for ids in (in_reasoning_ids, in_standard_ids):
        assert (
            tokenizer.decode(ids) == "<think>6*7=42</think> \\boxed{42}"
        )  # the text looks like a finished answer
    assert score(tokenizer, [in_reasoning_ids, in_standard_ids], ["42", "42"]) == ([0.0, 0.0], [0.0, 0.0])


def test_a_reopened_thought_that_never_closes_has_no_answer(tokenizer):
    ids = encode(tokenizer, "<think>a</think><think>\\boxed{42}")
    assert score(tokenizer, [ids], ["42"]) == ([0.0], [0.0])


def test_proper_completions_are_scored_on_their_answer(tokenizer):
    eos = tokenizer.eos_token_id
    right = encode(tokenizer, "<think>6*7=42</think>\n\nThe answer is \\boxed{42}.") + [eos]
    wrong = encode(tokenizer, "<think>6*7=41</think>\n\nThe answer is \\boxed{41}.") + [
        eos,
        tokenizer.pad_token_id,
    ]
    reasoned = [
        tokenizer.reasoning_vocab.think_start_id,
        *as_reasoning(tokenizer, "6*7=42"),
        tokenizer.reasoning_vocab.think_end_id,
        *encode(tokenizer, " \\boxed{42}"),
    ]
    assert score(tokenizer, [right, wrong, reasoned], ["42", "42", "42"]) == (
        [1.0, 0.0, 1.0],
        [1.0, 1.0, 1.0],
    )


def test_a_thought_opened_by_the_chat_template_is_closed_by_the_completion(tokenizer):
    ids = encode(tokenizer, "6*7=42</think>\n\n\\boxed{42}")
    assert score(tokenizer, [ids], ["42"], starts_in_thought=[True]) == ([1.0], [1.0])
    # the same ids after a prompt that left no thought open: an answer without a thought
    assert score(tokenizer, [ids], ["42"], starts_in_thought=[False]) == ([1.0], [0.0])
    # inside a thought the template opened, a completion that never closes it has no answer
    assert score(tokenizer, [encode(tokenizer, "so \\boxed{42}")], ["42"], starts_in_thought=[True]) == (
        [0.0],
        [0.0],
    )


@pytest.mark.parametrize(
    "text, solution, correct",
    [
        ("<think>6*7=42</think>\n\nThe answer is \\boxed{42}.", "42", True),
        ("<think>so \\boxed{42}", "42", False),  # the thought never closed: no answer
        ("<think>\\boxed{41}</think> \\boxed{42}", "42", True),  # only the answer after the thought counts
        ("<think>\\boxed{42}</think> \\boxed{41}", "42", False),
        ("<think>a</think> \\boxed{\\frac{1}{2}}", "0.5", True),
        ("<think>a</think> \\boxed{2\\pi}", "2\\pi", True),
        ("<think>a</think> \\boxed{2}", "2\\pi", False),
        ("<think>a</think> \\boxed{(1, 2]}", "(1,2]", True),
        ("<think>a</think> The answer is 42.", "42", False),  # no boxed answer
    ],
)
def test_accuracy_checks_the_boxed_answer_after_the_thought(tokenizer, text, solution, correct):
    assert score(tokenizer, [encode(tokenizer, text)], [solution])[0] == [float(correct)]


@pytest.mark.parametrize(
    "answer, solution, number, lenient",
    [
        ("So 5 - 3 - 6 = -4.", "-4", "-4", True),
        ("The answer is $28,080.", "28080", "28080", True),
        ("x = 3.50", "3.5", "3.50", True),
        ("\\boxed{\\frac{1}{2}}", "0.5", "2", True),  # the boxed answer is read first
        ("\\boxed{41}, or rather 42", "42", "42", True),
        ("It is 12. Step 3 follows.", "12", "3", False),  # the final number, whatever it means
        ("no number here", "1", None, False),
        ("1,2,3", "3", "3", True),  # a list, not a thousands separator
        ("version v1.2", "2", None, False),  # digits inside a word are no number
        ("", "0", None, False),
    ],
)
def test_the_lenient_reading_checks_the_final_number_boxed_or_not(answer, solution, number, lenient):
    assert final_number(answer) == number
    assert lenient_is_correct(answer, solution) is lenient
    assert not answer_is_correct(answer, solution) or lenient  # strict implies lenient


def test_the_lenient_reward_reads_the_answer_after_the_thought(tokenizer):
    (lenient,) = reward_functions(tokenizer, names=["lenient"])
    completions = [
        encode(tokenizer, t) for t in ("<think>it is 7</think> so 6*7 = 42.", "<think>42</think> 7")
    ]
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    assert lenient(texts, completion_ids=completions, solution=["42", "42"]) == [1.0, 0.0]


@pytest.mark.parametrize(
    "text, well_formed",
    [
        ("<think>a</think>\n\n\\boxed{1}", True),
        ("  <think>a</think> so \\boxed{1}.", True),
        ("<think>a</think>", False),  # no answer
        ("<think>a</think> \\boxed{1} or \\boxed{2}", False),  # two answers
        ("<think>a</think><think>b</think> \\boxed{1}", False),  # two thoughts
        ("a<think>b</think> \\boxed{1}", False),  # not opened first
        ("\\boxed{1}", False),  # no thought
    ],
)
def test_format_wants_one_closed_thought_then_one_boxed_answer(tokenizer, text, well_formed):
    assert score(tokenizer, [encode(tokenizer, text)], ["1"])[1] == [float(well_formed)]


def test_rewards_refuse_to_guess_the_structure_from_text(tokenizer):
    accuracy, _ = reward_functions(tokenizer)
    with pytest.raises(TypeError, match="completion_ids"):
        accuracy(["<think>a</think> \\boxed{1}"], solution=["1"])


# answers whose values sympy would compute for seconds or minutes; before the cost bound each took about 1 s
# in the main thread (math-verify's SIGALRM timeout) and ran on unbounded in any other thread
COSTLY = [
    "9^{9^{9^{9^{9}}}}",  # a tower
    "9^{9^{9}}",
    "2^{3^{4^{5}}}",
    "(2^{10})^{10^{7}}",  # a bracketed base
    "\\left(2^{10}\\right)^{10^{8}}",
    "(2^{10})^{(2^{10})^{2}}",
    "9^{999*9999}",  # exponents that are products
    "9^{99\\cdot 999}",
    "9^{99 \\times 999}",
    "1000000!",  # factorials
    "(10!)!",
    "10^{6}!",
    "1000000!!",
    "\\binom{10^{6}}{10^{5}}",  # binomials
    "\\dbinom{10^6}{5000}",
    "{10^{6} \\choose 5000}",
    "\\frac{1000000!}{2}",  # fractions of such
    "\\dfrac{1}{9^{9^{9}}}",
    "\\sqrt{2^{3000}+1}",  # a root of a large number, which sympy factors
    "(x+1)^{200}",  # powers of sums, which sympy multiplies out
    "(x+y+1)^{20}",
    "\\sum_{i=1}^{10^{9}} i",
    "(" * 400 + "1" + ")" * 400,  # nested too deep
    "1+" * 2000 + "1",  # too long
]
COMMON = [
    ("42", "42"), ("\\frac{1}{2}", "0.5"), ("2\\pi", "2\\pi"), ("(1, 2]", "(1,2]"), ("x^2-1", "(x-1)(x+1)"),
    ("2^{10}", "1024"), ("10!", "3628800"), ("\\binom{10}{3}", "120"), ("2^{2^{2^{2}}}", "65536"),
]  # fmt: skip


def in_a_thread(work):
    """`work()` run in another thread, as a server worker or a thread pool would: (its result, seconds)."""
    done = {}

    def run():
        started = time.perf_counter()
        done["result"] = work()
        done["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the reward call was still running after 10 s"
    return done["result"], done["seconds"]


def in_this_thread(work):
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


@pytest.mark.parametrize("run", [in_this_thread, in_a_thread], ids=["main-thread", "other-thread"])
def test_a_costly_answer_scores_zero_within_a_tenth_of_a_second_in_any_thread(tokenizer, run):
    for answer in COSTLY:
        ids = encode(tokenizer, f"<think>a</think> The answer is \\boxed{{{answer}}}.")
        (accuracy, _), seconds = run(lambda ids=ids: score(tokenizer, [ids], ["1"]))
        assert accuracy == [0.0] and seconds < 0.1, (answer, seconds)
        verdict, seconds = run(lambda answer=answer: answer_is_correct(f"\\boxed{{{answer}}}", answer))
        assert not verdict and seconds < 0.1, (answer, seconds)  # even compared with itself
    for answer, solution in COMMON:
        ids = encode(tokenizer, f"<think>a</think> The answer is \\boxed{{{answer}}}.")
        assert run(lambda ids=ids, solution=solution: score(tokenizer, [ids], [solution]))[0][0] == [1.0]


def test_costly_answers_are_refused_before_they_reach_math_verify(monkeypatch):
    monkeypatch.setattr(answers._Pool, "ask", lambda *a: pytest.fail("a costly answer was sent to be read"))
    for answer in COSTLY:
        assert answers.too_costly(answer) and not answer_is_correct(f"\\boxed{{{answer}}}", "1"), answer
        assert not answers.readable_answer(answer)
    for answer, solution in COMMON:  # and nothing a problem asks for is refused
        assert not answers.too_costly(answer) and not answers.too_costly(solution)


@pytest.mark.parametrize("run", [in_this_thread, in_a_thread], ids=["main-thread", "other-thread"])
def test_an_answer_that_passes_the_estimate_but_costs_more_is_stopped(tokenizer, run):
    """The estimate cannot know every slow path of sympy: there the child process that reads answers is
    interrupted after CPU_LIMIT_S of CPU time, and the next answer is read as before."""
    answers.start()
    assert run(lambda: answer_is_correct("\\boxed{42}", "42"))[0]  # a warm reader
    slow = "\\boxed{(x+1)^{30}(y+1)^{30}}"  # multiplied out: 961 terms, seconds of sympy
    assert not answers.too_costly(slow)
    verdict, seconds = run(lambda: answer_is_correct(slow, "7"))
    assert not verdict and seconds < answers.WALL_LIMIT_S, seconds
    verdict, seconds = run(lambda: answer_is_correct("\\boxed{6}", "6"))
    assert verdict and seconds < 0.1, seconds  # the same reader, still warm


def test_a_reader_stuck_in_one_long_step_is_killed_and_replaced(monkeypatch):
    """A computation inside one C call (a big-integer power) cannot be interrupted: the reader is killed at
    WALL_LIMIT_S, and a fresh one reads the next answer."""
    monkeypatch.setattr(answers, "too_costly", lambda text: False)  # let a tower through to math-verify
    answers.start()
    assert answer_is_correct("\\boxed{42}", "42")
    verdict, seconds = in_a_thread(lambda: answer_is_correct("\\boxed{9^{9^{9}}}", "1"))
    assert not verdict and seconds < answers.WALL_LIMIT_S + 0.1, seconds
    assert answer_is_correct("\\boxed{\\frac{1}{2}}", "0.5") and not answer_is_correct("\\boxed{3}", "4")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_text_is_sized_without_an_error(seed):
    """An untrained model writes anything, other scripts' digits included (`٠`, `⓷`, `፪`): reading its answer
    never raises, so one odd completion cannot stop a training step or an evaluation."""
    generator = random.Random(seed)
    alphabet = (
        [chr(c) for c in range(0x20, 0x3000)] + list("0123456789^{}()[]!.,+-*/ ") + ["\\frac", "\\binom"]
    )
    for _ in range(5000):
        text = "".join(generator.choice(alphabet) for _ in range(generator.randint(1, 30)))
        answers.too_costly(text)
        answers.final_number(text)
    assert not answers.too_costly("٠") and answers.final_number("x = ٣, so 12") == "12"
    assert not answer_is_correct("\\boxed{٣}", "3") and not lenient_is_correct("٠٣", "3")


def test_answers_checked_from_several_threads_at_once_get_their_own_verdicts():
    """Concurrent callers (a thread pool scoring a batch) each use a reader of their own, none waits for
    another's answer, and every verdict belongs to its own question."""
    pairs = [(f"\\boxed{{{n}}}", str(n + (n % 3 == 0))) for n in range(40)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        verdicts = list(pool.map(lambda pair: answer_is_correct(*pair), pairs))
    assert verdicts == [n % 3 != 0 for n in range(40)]


def test_rewards_are_chosen_by_name_with_weights_in_order():
    assert parse_rewards("accuracy:1,format:0.5") == [("accuracy", 1.0), ("format", 0.5)]
    assert parse_rewards(" format : 2 , accuracy ") == [
        ("format", 2.0),
        ("accuracy", 1.0),
    ]  # a bare name weighs 1


@pytest.mark.parametrize(
    "spec, message",
    [
        ("accuracy:1,length:0.5", "unknown reward 'length'; known: accuracy, lenient, format"),
        ("accuracy:1,accuracy:2", "names 'accuracy' twice"),
        ("accuracy:heavy", "'heavy' is not a finite weight"),
        ("format:nan", "'nan' is not a finite weight"),
        (" , ", "names no reward"),
    ],
)
def test_a_bad_rewards_spec_is_refused_in_one_line(spec, message):
    with pytest.raises(InputError, match=re.escape(message)) as caught:
        parse_rewards(spec)
    assert "\n" not in str(caught.value)


def test_the_trainer_gets_the_chosen_functions_and_weights_in_order(tokenizer):
    settings = TrainSettings(rewards="format:0.5,accuracy:2", max_steps=1, output_dir="unused")
    assert grpo_config(settings, {}).reward_weights == [0.5, 2.0]
    names = [name for name, _ in chosen_rewards(settings)]
    assert [f.__name__ for f in reward_functions(tokenizer, names=names)] == [
        "format_reward",
        "accuracy_reward",
    ]
    # without `rewards`, the two weights of their own choose accuracy and format, as before
    default = TrainSettings(format_weight=0.25, max_steps=1, output_dir="unused")
    assert chosen_rewards(default) == [("accuracy", 1.0), ("format", 0.25)]
    assert grpo_config(default, {}).reward_weights == [1.0, 0.25]


def test_rewards_and_the_old_weights_together_are_one_clear_error():
    settings = TrainSettings(rewards="accuracy:1", format_weight=0.5)
    with pytest.raises(InputError, match="rewards='accuracy:1' and accuracy_weight/format_weight both set"):
        chosen_rewards(settings)
