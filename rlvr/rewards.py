"""Verifiable rewards, read from token ids: math-verify accuracy of the boxed answer, a lenient accuracy of
the answer's final number, and format.

The answer is the completion's span after its thought as the ids define it (`rlvr.thoughts`): a `</think>`
spelled out in ordinary tokens closes nothing, and a completion that ends inside a thought has no answer, so
the policy cannot earn reward with an answer written inside the thought, in reasoning ids or otherwise. Only
the answer span is decoded for math-verify.

Rewards are registered by name in `REWARDS`: each scores one `Completion` (its ids, their thought structure,
the tokenizer and its prompt's dataset columns), so a new reward is one function and one line there. Training
picks them with weights (`parse_rewards("accuracy:1,format:0.5")`), and `reward_functions(tokenizer, names)`
turns them into TRL-style reward functions named `<name>_reward`: TRL calls those with `completions`,
`completion_ids` and the dataset columns as keyword lists; rlvr's trainer also passes `starts_in_thought`
(whether each prompt's chat template opened the thought).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from latex2sympy2_extended import NormalizationConfig
from math_verify import LatexExtractionConfig, parse, verify
from transformers import PreTrainedTokenizerBase

from rlvr import thoughts
from rlvr.errors import InputError

BOXED = "\\boxed{"
# appended to each problem: asks for the boxed answer that the rewards and evaluation check
DEFAULT_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
MAX_ANSWER_CHARS = 1000  # longer final answers are not parsed: they score 0 rather than stall a training step
MAX_BRACE_DEPTH = 12  # nesting deeper than this is not a final answer a problem here asks for
MAX_TOWER = 2  # nor a power of a power (`9^{9^{9}}` has 370 million digits), nor a 5-digit exponent
_HUGE_EXPONENT = re.compile(r"\^\s*\{?\s*\d{5,}")
# a plain decimal number, optionally signed, with or without thousands separators (12,345.5)
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# math-verify times out with SIGALRM, which only the main thread may use; elsewhere the caps above bound the
# cost
PARSE_TIMEOUT_S, VERIFY_TIMEOUT_S = 1, 1


def _timeouts() -> tuple[int | None, int | None]:
    if threading.current_thread() is threading.main_thread():
        return PARSE_TIMEOUT_S, VERIFY_TIMEOUT_S
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return None, None


_ANSWER_EXTRACTION = [
    LatexExtractionConfig(
        normalization_config=NormalizationConfig(units=True),
        boxed_match_priority=0,  # the boxed answer wins over any other expression in the text
        try_extract_without_anchor=False,
    )
]


def too_costly(text: str) -> bool:
    """Whether parsing `text` could take seconds: too long, nested too deep, or a tower of exponents."""
    if len(text) > MAX_ANSWER_CHARS or _HUGE_EXPONENT.search(text):
        return True
    deepest = tower = 0
    exponent_braces: list[bool] = []  # per open bracket: whether it holds an exponent
    for position, char in enumerate(text):
        if char in "{([":
            opens_exponent = char == "{" and text[:position].rstrip().endswith("^")
            exponent_braces.append(opens_exponent)
            deepest = max(deepest, len(exponent_braces))
            tower = max(tower, sum(exponent_braces) + 1) if opens_exponent else tower
        elif char in "})]" and exponent_braces:
            exponent_braces.pop()
    return deepest > MAX_BRACE_DEPTH or tower > MAX_TOWER


def parse_answer(answer: str) -> list:
    """math-verify's reading of a final answer, boxed as a completion states it; empty when it means nothing.

    Boxing matters: a bare `2\\pi` or `3, 4` would be read as the first or last plain number in it.
    """
    if too_costly(answer):
        return []
    parsing_timeout, _ = _timeouts()
    parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=parsing_timeout)
    return parsed if any(not isinstance(value, str) for value in parsed) else []


def answer_is_correct(answer: str, solution: str) -> bool:
    """Whether the boxed answer in `answer` (a completion's answer span) equals `solution` (math-verify)."""
    if not answer or too_costly(answer):
        return False
    parsing_timeout, verify_timeout = _timeouts()
    gold = parse_answer(solution)
    predicted = parse(
        answer,
        extraction_config=_ANSWER_EXTRACTION,
        extraction_mode="first_match",
        parsing_timeout=parsing_timeout,
    )
    return bool(gold and predicted and verify(gold, predicted, timeout_seconds=verify_timeout))


def final_number(answer: str) -> str | None:
    """The last plain number written in `answer` (thousands separators dropped), or None."""
    numbers = _NUMBER.findall(answer or "")
    return numbers[-1].replace(",", "") if numbers else None


def lenient_is_correct(answer: str, solution: str) -> bool:
    """Whether `answer` is right by a lenient reading: its boxed answer is correct (`answer_is_correct`), or
    its final number equals `solution` (math-verify), boxed or not.

    A chat model that was never asked for `\\boxed{}` answers `... = 12.`: strict accuracy scores it 0, so a
    policy that merely learns the format would look like one that learns the task. This reading separates the
    two; it can also credit a number that was not meant as the answer, so it is a lower bar, not a better one.
    """
    if answer_is_correct(answer, solution):
        return True
    number = final_number(answer)
    if number is None:
        return False
    _, verify_timeout = _timeouts()
    gold, predicted = parse_answer(solution), parse_answer(number)
    return bool(gold and predicted and verify(gold, predicted, timeout_seconds=verify_timeout))


def answer_text(
    structure: thoughts.Structure, ids: Sequence[int], tokenizer: PreTrainedTokenizerBase
) -> str | None:
    """The decoded answer span (reasoning ids as their twins), or None when the completion has no answer."""
    if structure.answer is None:
        return None
    return tokenizer.decode(list(ids)[structure.answer], skip_special_tokens=True).strip()


def well_formed(
    structure: thoughts.Structure, ids: Sequence[int], tokenizer: PreTrainedTokenizerBase
) -> bool:
    """One thought, first in the completion (only whitespace before it) and closed, then exactly one boxed
    answer."""
    if structure.thoughts != 1 or not structure.closed:
        return False
    if tokenizer.decode(list(ids)[structure.prefix], skip_special_tokens=True).strip():
        return False
    return (answer_text(structure, ids, tokenizer) or "").count(BOXED) == 1


@dataclass(frozen=True)
class Completion:
    """One completion as a reward sees it: its ids up to the stop token, their thought structure, the
    tokenizer that decodes them, and the dataset columns of its prompt (`solution`, ...)."""

    ids: list[int]
    structure: thoughts.Structure
    tokenizer: PreTrainedTokenizerBase
    columns: Mapping[str, Any]

    @property
    def answer(self) -> str | None:
        return answer_text(self.structure, self.ids, self.tokenizer)


def accuracy(completion: Completion) -> float:
    """1.0 when the answer after the thought is correct, else 0.0."""
    return float(answer_is_correct(completion.answer or "", completion.columns["solution"]))


def lenient(completion: Completion) -> float:
    """1.0 when the answer after the thought is right by `lenient_is_correct` (its final number), else 0.0."""
    return float(lenient_is_correct(completion.answer or "", completion.columns["solution"]))


def format_(completion: Completion) -> float:
    """1.0 for one closed thought followed by one boxed answer, else 0.0."""
    return float(well_formed(completion.structure, completion.ids, completion.tokenizer))


REWARDS: dict[str, Callable[[Completion], float]] = {
    "accuracy": accuracy,
    "lenient": lenient,
    "format": format_,
}


def parse_rewards(spec: str) -> list[tuple[str, float]]:
    """`name:weight` entries, separated by commas (`accuracy:1,format:0.5`; a bare name weighs 1), in
    order."""
    chosen: dict[str, float] = {}
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        name, sep, text = (part.strip() for part in entry.partition(":"))
        if name not in REWARDS:
            raise InputError(
                f"rewards={spec!r} names an unknown reward {name!r}; known: {', '.join(REWARDS)}."
            )
        if name in chosen:
            raise InputError(f"rewards={spec!r} names {name!r} twice; give each reward one weight.")
        try:
            weight = float(text) if sep else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise InputError(
                f"rewards={spec!r}: {text!r} is not a finite weight for {name!r}; write e.g. {name}:0.5."
            )
        chosen[name] = weight
    if not chosen:
        raise InputError(f"rewards={spec!r} names no reward; write e.g. rewards=accuracy:1,format:0.5.")
    return list(chosen.items())


def _completion_ids(completion_ids) -> list[list[int]]:
    if completion_ids is None:
        raise TypeError(
            "rlvr's rewards read the thought from token ids: call them with completion_ids=... (TRL passes "
            "it)."
        )
    return [[int(i) for i in ids] for ids in completion_ids]


def _rows(columns: Mapping[str, Any], count: int) -> list[dict[str, Any]]:
    """Each completion's dataset columns. TRL passes a column as a list with one entry per completion, beside
    values that are no column (the trainer state, logging callbacks)."""
    lists = {key: value for key, value in columns.items() if isinstance(value, list)}
    for key, value in lists.items():
        if len(value) != count:
            raise ValueError(f"column {key!r} has {len(value)} entries for {count} completions")
    return [{key: value[i] for key, value in lists.items()} for i in range(count)]


def reward_functions(
    tokenizer: PreTrainedTokenizerBase,
    vocab: thoughts.ThoughtTags | None = None,
    names: Sequence[str] = ("accuracy", "format"),
) -> list[Callable[..., list[float]]]:
    """TRL-style reward functions `<name>_reward`, one per registered reward in `names`, in that order, for
    completions of a model with `tokenizer` (faithful, with its vocab; pass `vocab` for a plain tokenizer).

    The tokenizer's EOS and padding are stripped from the ids before the structure is read.
    """
    tags = vocab if vocab is not None else tokenizer.reasoning_vocab
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}

    def batched(name: str) -> Callable[..., list[float]]:
        score = REWARDS[name]

        def reward(completions, completion_ids=None, starts_in_thought=None, **columns) -> list[float]:
            all_ids = [until_stop(ids, stop) for ids in _completion_ids(completion_ids)]
            starts = starts_in_thought or [False] * len(all_ids)
            rows = _rows(columns, len(all_ids))
            return [
                score(Completion(ids, thoughts.structure(tags, ids, bool(inside)), tokenizer, row))
                for ids, inside, row in zip(all_ids, starts, rows, strict=True)
            ]

        reward.__name__ = reward.__qualname__ = f"{name}_reward"
        reward.__doc__ = score.__doc__
        return reward

    return [batched(name) for name in names]


def until_stop(ids: Sequence[int], stop: Collection[int]) -> list[int]:
    """The completion up to (not including) its first stop token; samplers pad only after that."""
    ids = [int(i) for i in ids]
    for position, token in enumerate(ids):
        if token in stop:
            return ids[:position]
    return ids
