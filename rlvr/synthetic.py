"""Synthetic verifiable math: seeded arithmetic problems whose answers math-verify checks exactly.

The offline stand-in for DeepScaleR and the warm-start corpus for the `micro` preset. A problem chains
`ops` operations left to right, e.g. `(3+4)*5`, so its worked solution is one line per operation; the
reference is written in the target format `<think>\\n...steps...\\n</think>\\n\\nThe answer is \\boxed{N}.`
that a reasoning model should learn. Problems are distinct by text, so any partition of them into train and
test shares no problem.

The default difficulty (1-2 operations on 1-2 digit numbers, single-digit multipliers, no negative results)
is what a ~1M-parameter model learns in minutes on a CPU; the knobs make it harder.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

from rlvr.errors import InputError, switch
from rlvr.thoughts import THINK_END, THINK_START

QUESTION = "What is {expression}?"
ANSWER_LINE = "The answer is \\boxed{{{answer}}}."
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}


@dataclass(frozen=True)
class Difficulty:
    """Knobs of the generator: operand digits, chain length, operations, multiplier size, negative results,
    and `errors`, the fraction of worked solutions with one wrong step (the answer column stays right)."""

    digits: int = 2
    min_ops: int = 1
    max_ops: int = 2
    operations: str = "+-*"
    factor_digits: int = 1
    negative: bool = False
    errors: float = 0.0

    def __post_init__(self):
        problems = []
        if not 0.0 <= self.errors <= 1.0:
            problems.append("errors must be a fraction in 0..1")
        if not 1 <= self.digits <= 18 or not 1 <= self.factor_digits <= 18:
            problems.append("digits and factor_digits must be 1..18")
        if not 1 <= self.min_ops <= self.max_ops:
            problems.append("need 1 <= min_ops <= max_ops")
        if not self.operations or set(self.operations) - set(_PRECEDENCE):
            problems.append("operations must be a non-empty string of + - *")
        if problems:
            raise InputError(f"synthetic difficulty {self} is invalid: {'; '.join(problems)}.")

    @classmethod
    def from_options(cls, options: dict[str, str]) -> Difficulty:
        """Parse `key=value` options as given in a source like `synthetic:digits=3,max_ops=3`."""
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InputError(f"unknown synthetic option(s) {unknown}; known: {sorted(known)} and count.")
        try:
            values = {k: _parse_option(v, known[k]) for k, v in options.items()}
        except ValueError as error:
            raise InputError(
                f"synthetic options {options} are malformed ({error}); use e.g. digits=3,negative=true."
            ) from error
        return cls(**values)


def _parse_option(value: str, kind: str):
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bool":
        return switch(value, auto=False)
    return value


@dataclass(frozen=True)
class Problem:
    """One generated problem: its text, the plain answer string and the worked reference."""

    question: str
    solution: str
    reference: str


def _operand(rng: random.Random, digits: int) -> int:
    width = rng.randint(1, digits)
    return rng.randint(0 if width == 1 else 10 ** (width - 1), 10**width - 1)


def _next_operand(rng: random.Random, op: str, value: int, difficulty: Difficulty) -> int:
    if op == "*":
        return max(2, _operand(rng, difficulty.factor_digits))
    if op == "-" and not difficulty.negative:
        return rng.randint(0, min(value, 10**difficulty.digits - 1))
    return _operand(rng, difficulty.digits)


def make_problem(rng: random.Random, difficulty: Difficulty) -> Problem:
    """Draw one problem; operations apply left to right, with parentheses where precedence would reorder them.

    With `difficulty.errors`, that fraction of worked solutions gets one step whose result is off by 1-9 (as a
    noisy teacher writes them); the following steps go on from the wrong value, so the reference's boxed
    answer is wrong too, while `solution`, which rewards and evaluation check against, is the true value.
    """
    value = truth = _operand(rng, difficulty.digits)
    expression, top_precedence = str(value), 3
    steps = []
    count = rng.randint(difficulty.min_ops, difficulty.max_ops)
    # drawn only when errors are asked for, so error-free data is the same as before the knob existed
    wrong_step = rng.randrange(count) if difficulty.errors and rng.random() < difficulty.errors else -1
    for index in range(count):
        op = rng.choice(difficulty.operations)
        operand = _next_operand(rng, op, value, difficulty)
        result, truth = _apply(value, op, operand), _apply(truth, op, operand)
        if index == wrong_step:
            result = _miscalculate(rng, result, difficulty.negative)
        steps.append(f"{value}{op}{operand}={result}")
        if _PRECEDENCE[op] > top_precedence:
            expression = f"({expression})"
        expression, top_precedence = f"{expression}{op}{operand}", _PRECEDENCE[op]
        value = result
    reference = (
        f"{THINK_START}\n" + "\n".join(steps) + f"\n{THINK_END}\n\n" + ANSWER_LINE.format(answer=value)
    )
    return Problem(QUESTION.format(expression=expression), str(truth), reference)


def _apply(value: int, op: str, operand: int) -> int:
    return value + operand if op == "+" else value - operand if op == "-" else value * operand


def _miscalculate(rng: random.Random, result: int, negative: bool) -> int:
    offsets = [d for d in range(-9, 10) if d and (negative or result + d >= 0)]
    return result + rng.choice(offsets)


def generate(count: int, seed: int = 0, difficulty: Difficulty = Difficulty()) -> list[Problem]:
    """`count` distinct problems, the same for the same arguments."""
    if count < 1:
        raise InputError(f"synthetic count must be at least 1, got {count}.")
    rng = random.Random(seed)
    problems: dict[str, Problem] = {}
    for _ in range(20 * count + 1000):
        problem = make_problem(rng, difficulty)
        problems.setdefault(problem.question, problem)
        if len(problems) == count:
            return list(problems.values())
    raise InputError(
        f"only {len(problems)} distinct synthetic problems were found for count={count} at {difficulty}; "
        "ask for fewer or raise digits/max_ops."
    )
