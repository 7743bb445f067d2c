"""Rewards are pure functions of the completion text and the gold answer."""

import pytest

from rlvr.rewards import accuracy_reward, format_reward, is_correct, is_well_formed, split_completion


@pytest.mark.parametrize(
    "text, solution, correct",
    [
        ("<think>6*7=42</think>\n\nThe answer is \\boxed{42}.", "42", True),
        ("<think>6*7=41</think>\n\nThe answer is \\boxed{41}.", "42", False),
        ("<think>so \\boxed{42}", "42", False),  # the thought never closed: no answer
        ("<think>\\boxed{41}</think> \\boxed{42}", "42", True),  # only the answer after the thought counts
        ("<think>a</think> \\boxed{\\frac{1}{2}}", "0.5", True),
        ("<think>a</think> \\boxed{2\\pi}", "2\\pi", True),
        ("<think>a</think> \\boxed{2}", "2\\pi", False),
        ("<think>a</think> \\boxed{(1, 2]}", "(1,2]", True),
        ("<think>a</think> The answer is 42.", "42", False),  # no boxed answer
        ("</think>\\boxed{-7}", "-7", True),  # the template may have opened the thought
    ],
)
def test_accuracy_checks_the_boxed_answer_after_the_thought(text, solution, correct):
    assert is_correct(text, solution) is correct


def test_reward_functions_follow_trls_signature():
    completions = [[{"role": "assistant", "content": "<think>x</think> \\boxed{3}"}],
                   [{"role": "assistant", "content": "<think>x</think> \\boxed{4}"}]]
    assert accuracy_reward(completions, solution=["3", "3"], trainer_state=None) == [1.0, 0.0]
    assert format_reward(completions) == [1.0, 1.0]
    assert accuracy_reward(["<think></think>\\boxed{3}"], solution=["3"]) == [1.0]


@pytest.mark.parametrize(
    "text, well_formed",
    [
        ("<think>a</think>\n\n\\boxed{1}", True),
        ("  <think>a</think> so \\boxed{1}.", True),
        ("<think>a</think>", False),  # no answer
        ("<think>a</think> \\boxed{1} or \\boxed{2}", False),  # two answers
        ("<think>a<think>b</think> \\boxed{1}", False),  # opened twice
        ("a</think> \\boxed{1}", False),  # not opened first
        ("<think>a</think> \\boxed{1} </think>", False),  # closed twice
    ],
)
def test_format_wants_one_closed_thought_then_one_boxed_answer(text, well_formed):
    assert is_well_formed(text) is well_formed


def test_split_completion_separates_thought_and_answer():
    parts = split_completion("<think>\nstep 1\n</think>\n\nThe answer is \\boxed{5}.")
    assert (parts.thought, parts.answer, parts.closed) == ("step 1", "The answer is \\boxed{5}.", True)
    open_only = split_completion("<think>still thinking")
    assert (open_only.thought, open_only.answer, open_only.closed) == ("still thinking", "", False)
