"""The synthetic task: seeded, arithmetically right, in the target format, distinct problems, disjoint
splits."""

import re
from itertools import pairwise

import pyarrow.parquet as pq
import pytest

from rlvr.answers import readable_answer
from rlvr.errors import InputError
from rlvr.preprocess import Options, preprocess
from rlvr.synthetic import Difficulty, generate

REFERENCE = re.compile(r"<think>\n((?:[^\n]+\n)+)</think>\n\nThe answer is \\boxed\{(-?\d+)\}\.")
STEP = re.compile(r"(-?\d+)([+\-*])(\d+)=(-?\d+)")
QUESTION = re.compile(r"What is ([\d+\-*()]+)\?")


def _check(problem) -> list[tuple[int, str, int, int]]:
    """Assert the problem is right and well formed; returns its steps."""
    reference = REFERENCE.fullmatch(problem.reference)
    assert reference, problem.reference
    assert reference.group(2) == problem.solution
    steps = [STEP.fullmatch(line) for line in reference.group(1).splitlines()]
    assert all(steps), reference.group(1)
    steps = [(int(a), op, int(b), int(c)) for a, op, b, c in (s.groups() for s in steps)]
    for a, op, b, c in steps:
        assert {"+": a + b, "-": a - b, "*": a * b}[op] == c
    for (_, _, _, result), (a, _, _, _) in pairwise(steps):
        assert a == result  # each step continues from the last
    assert steps[-1][3] == int(problem.solution)
    expression = QUESTION.fullmatch(problem.question).group(1)
    assert eval(expression, {"__builtins__": {}}) == int(problem.solution)  # parentheses keep the step order
    return steps


def test_default_problems_are_right_and_modest():
    problems = generate(1000, seed=3)
    assert len({p.question for p in problems}) == 1000
    counts = set()
    for problem in problems:
        steps = _check(problem)
        counts.add(len(steps))
        for _, op, b, c in steps:
            assert c >= 0 and b < 100
            if op == "*":
                assert 2 <= b <= 9
        assert readable_answer(problem.solution)
    assert counts == {1, 2}
    assert max(len(p.question) for p in problems) <= 20  # short prompts: micro's tokens are costly on a CPU


def test_knobs_make_it_harder():
    hard = Difficulty(digits=3, min_ops=3, max_ops=4, operations="-*", factor_digits=2, negative=True)
    problems = generate(500, seed=0, difficulty=hard)
    steps = [_check(p) for p in problems]
    assert {len(s) for s in steps} == {3, 4}
    assert {op for s in steps for _, op, _, _ in s} == {"-", "*"}
    assert any(int(p.solution) < 0 for p in problems)
    assert any(b >= 100 for s in steps for _, op, b, _ in s if op == "-")
    assert any(b >= 10 for s in steps for _, op, b, _ in s if op == "*")


def test_teacher_errors_corrupt_one_step_of_that_share_of_solutions_and_never_the_answer():
    clean = generate(2000, seed=5, difficulty=Difficulty(digits=1))
    noisy = generate(2000, seed=5, difficulty=Difficulty(digits=1, errors=0.3))
    assert generate(300, seed=5, difficulty=Difficulty(errors=0.0)) == generate(
        300, seed=5
    )  # no knob, same data
    wrong = 0
    for problem in noisy:
        expression = QUESTION.fullmatch(problem.question).group(1)
        assert eval(expression, {"__builtins__": {}}) == int(
            problem.solution
        )  # the answer column stays right
        reference = REFERENCE.fullmatch(problem.reference)
        steps = [tuple(STEP.fullmatch(line).groups()) for line in reference.group(1).splitlines()]
        off = [
            int(c) - {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            for a, op, b, c in steps
        ]
        assert sum(1 for d in off if d) <= 1 and all(
            abs(d) <= 9 and int(c) >= 0 for d, (*_, c) in zip(off, steps, strict=True)
        )
        for (*_, result), (a, *_) in pairwise(steps):
            assert a == result  # the chain goes on from the wrong value
        assert reference.group(2) == steps[-1][3]
        wrong += reference.group(2) != problem.solution
    assert 0.26 < wrong / len(noisy) < 0.34  # binomial sd at 2000 draws is 0.01
    assert all(_check(p) for p in clean)
    with pytest.raises(InputError, match="errors must be a fraction"):
        Difficulty.from_options({"errors": "1.5"})
    assert Difficulty.from_options({"errors": "0.25"}).errors == 0.25


def test_seeded():
    assert generate(50, seed=7) == generate(50, seed=7)
    assert generate(50, seed=7) != generate(50, seed=8)


def test_options_parse_and_reject():
    assert Difficulty.from_options({"digits": "3", "negative": "true", "operations": "+"}) == Difficulty(
        digits=3, negative=True, operations="+"
    )
    for options in (
        {"digit": "3"},
        {"digits": "three"},
        {"negative": "maybe"},
        {"operations": "/"},
        {"min_ops": "3"},
    ):
        with pytest.raises(InputError):
            Difficulty.from_options(options)


def test_too_few_distinct_problems_is_an_error():
    tiny = Difficulty(digits=1, max_ops=1, operations="+")  # 100 distinct sums
    assert len(generate(100, seed=0, difficulty=tiny)) == 100
    with pytest.raises(InputError, match="only 100 distinct"):
        generate(101, seed=0, difficulty=tiny)


@pytest.mark.parametrize("seed", [0, 1])
def test_preprocessed_splits_are_disjoint(tmp_path, seed):
    result = preprocess(
        "synthetic:count=1500,digits=1,max_ops=2", tmp_path, Options(test_size=0.3, seed=seed)
    )
    train, test = (pq.read_table(result.paths[s]).to_pylist() for s in ("train", "test"))
    assert (len(train), len(test)) == (1050, 450)
    assert not {r["prompt"][-1]["content"] for r in train} & {r["prompt"][-1]["content"] for r in test}
    assert not {r["id"] for r in train} & {r["id"] for r in test}
