"""Verifiable rewards on faithful completion text: math-verify accuracy of the boxed answer, and format.

The answer is what follows the thought. A completion whose thought never closes has no answer and earns no
accuracy, so the policy cannot win by boxing a guess mid-thought. Both functions follow TRL's reward-function
signature (`completions`, dataset columns as keyword lists) and work on plain strings too.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from latex2sympy2_extended import NormalizationConfig
from math_verify import LatexExtractionConfig, parse, verify

THINK_START, THINK_END, BOXED = "<think>", "</think>", "\\boxed{"


@dataclass(frozen=True)
class Completion:
    """A completion split at its thought: `thought` without tags, `answer` after `</think>`."""

    thought: str
    answer: str
    closed: bool


def split_completion(text: str) -> Completion:
    start = text.find(THINK_START)
    end = text.rfind(THINK_END)
    if end < 0:
        thought = text[start + len(THINK_START) :] if start >= 0 else ""
        return Completion(thought=thought.strip(), answer="", closed=False)
    begin = start + len(THINK_START) if 0 <= start < end else 0
    return Completion(thought=text[begin:end].strip(), answer=text[end + len(THINK_END) :].strip(), closed=True)


def _timeouts() -> tuple[int | None, int | None]:
    # math-verify times out with SIGALRM, which only the main thread may use
    if threading.current_thread() is threading.main_thread():
        return 10, 5
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return None, None


_ANSWER_EXTRACTION = [
    LatexExtractionConfig(
        normalization_config=NormalizationConfig(units=True),
        boxed_match_priority=0,  # the boxed answer wins over any other expression in the text
        try_extract_without_anchor=False,
    )
]


def parse_answer(answer: str) -> list:
    """math-verify's reading of a final answer, boxed as a completion states it; empty when it means nothing.

    Boxing matters: a bare `2\\pi` or `3, 4` would be read as the first or last plain number in it.
    """
    parsing_timeout, _ = _timeouts()
    parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=parsing_timeout)
    return parsed if any(not isinstance(value, str) for value in parsed) else []


def is_correct(completion_text: str, solution: str) -> bool:
    """Whether the boxed answer after the thought equals `solution` (math-verify equivalence)."""
    answer = split_completion(completion_text).answer
    if not answer:
        return False
    parsing_timeout, verify_timeout = _timeouts()
    gold = parse_answer(solution)
    predicted = parse(answer, extraction_config=_ANSWER_EXTRACTION, extraction_mode="first_match",
                      parsing_timeout=parsing_timeout)
    return bool(gold and predicted and verify(gold, predicted, timeout_seconds=verify_timeout))


def is_well_formed(completion_text: str) -> bool:
    """One thought, opened first and closed once, then exactly one boxed answer."""
    text = completion_text.lstrip()
    if not text.startswith(THINK_START) or text.count(THINK_START) != 1 or text.count(THINK_END) != 1:
        return False
    return split_completion(text).answer.count(BOXED) == 1


def _texts(completions) -> list[str]:
    return [c[-1]["content"] if isinstance(c, list) else c for c in completions]


def accuracy_reward(completions, solution: list[str], **kwargs) -> list[float]:
    """1.0 for a correct final answer, else 0.0."""
    return [float(is_correct(text, gold)) for text, gold in zip(_texts(completions), solution, strict=True)]


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 for a well-formed completion, else 0.0."""
    return [float(is_well_formed(text)) for text in _texts(completions)]
