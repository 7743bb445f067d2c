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
(whether each prompt's chat template opened the thought). Checking an answer is bounded in cost in any
thread (`rlvr.answers`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from rlvr import answers, thoughts
from rlvr.answers import answer_is_correct, lenient_is_correct
from rlvr.errors import InputError

BOXED = "\\boxed{"
# Appended to each problem: it asks for the boxed answer that the rewards and evaluation check.
DEFAULT_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def answer_groups(
    spans: Sequence[str | None], correct: Sequence[bool]
) -> tuple[list[int | None], int | None]:
    """Each sample's answer group for a majority vote, from its answer span, and the group of the right
    answer (None: no sample has it). Equal answers share a group: the correct ones all equal the solution
    (group 0); a wrong one joins the first group whose first answer math-verify finds equal to it, else opens
    one. A sample without a boxed answer has no group (None). Every reading is bounded (`rlvr.answers`)."""
    groups: list[int | None] = []
    firsts: list[tuple[int, str]] = []  # (group, first answer span) of the wrong groups
    by_text: dict[str, int | None] = {}
    for text, is_right in zip(spans, correct, strict=True):
        if is_right:
            groups.append(0)
            continue
        if text not in by_text:
            found = None
            if answers.has_answer(text):
                found = next((g for g, first in firsts if answers.same_answer(text, first)), None)
                if found is None:
                    found = len(firsts) + 1
                    firsts.append((found, text))
            by_text[text] = found
        groups.append(by_text[text])
    return groups, 0 if any(correct) else None


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
            "rlvr's rewards read the thought from token ids: call them with completion_ids=... "
            "(TRL passes it)."
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
    answers.start()  # warm by the first rollout

    def batched(name: str) -> Callable[..., list[float]]:
        score = REWARDS[name]

        def reward(completions, completion_ids=None, starts_in_thought=None, **columns) -> list[float]:
            all_ids = [thoughts.until_stop(ids, stop) for ids in _completion_ids(completion_ids)]
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
