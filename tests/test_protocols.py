"""maj@k, pass@k and avg@n against brute-force enumeration, and answers grouped by math-verify for voting."""

import dataclasses
import itertools
import random
from collections import Counter

import pytest
from conftest import scored

from rlvr.evaluation import ProblemScores, Scored, dataset_metrics
from rlvr.protocols import ladder, majority_at_k, pass_at_k
from rlvr.rewards import answer_groups


def brute_force_majority(votes, correct, k: int) -> float:
    """The share of k-subsets whose majority answer is the correct one, a tie counting 1 / (tied groups)."""
    subsets = list(itertools.combinations(range(len(votes)), k))
    total = 0.0
    for subset in subsets:
        counts = Counter(votes[i] for i in subset if votes[i] is not None)
        if correct is None or not counts:
            continue
        top = max(counts.values())
        winners = [group for group, count in counts.items() if count == top]
        total += (correct in winners) / len(winners)
    return total / len(subsets)


def test_majority_at_k_equals_enumeration_over_every_subset():
    generator = random.Random(0)
    for _ in range(200):
        n = generator.randint(1, 9)
        votes = [generator.choice([None, 0, 1, 2, 3]) for _ in range(n)]
        correct = 0 if 0 in votes else None
        for k in range(1, n + 1):
            assert majority_at_k(votes, correct, k) == pytest.approx(
                brute_force_majority(votes, correct, k), abs=1e-12
            ), (votes, k)


def test_majority_at_k_of_sixty_four_samples_takes_no_time_to_count():
    votes = [0] * 20 + list(range(1, 45))  # 20 right, 44 different wrong answers
    assert majority_at_k(votes, 0, 64) == 1.0
    assert 0 < majority_at_k(votes, 0, 2) < majority_at_k(votes, 0, 8) < 1
    with pytest.raises(ValueError):
        majority_at_k(votes, 0, 65)


def test_the_default_ladder_doubles_up_to_the_samples():
    assert ladder(16) == [1, 2, 4, 8, 16] and ladder(12) == [1, 2, 4, 8, 12] and ladder(1) == [1]


def _scored(correct: bool, vote: int | None) -> Scored:
    return dataclasses.replace(scored(correct), vote=vote)


def test_benchmark_metrics_equal_brute_force_over_random_problems():
    """avg@n is the mean share of correct samples, pass@k the share of k-subsets holding a correct sample,
    maj@k the enumerated majority vote, each averaged over problems."""
    generator = random.Random(1)
    n, problems = 6, []
    for _ in range(12):
        votes = [generator.choice([None, 0, 1, 2]) for _ in range(n)]
        right = 0 if 0 in votes else None
        problems.append(ProblemScores([_scored(v == 0, v) for v in votes], right))
    metrics = dataset_metrics(problems, ks=[1, 2, 4, 6])
    shares = [sum(s.correct for s in p.samples) / n for p in problems]
    assert metrics["accuracy"] == pytest.approx(sum(shares) / len(problems))
    for k in (1, 2, 4, 6):
        brute_pass = [
            sum(any(p.samples[i].correct for i in subset) for subset in itertools.combinations(range(n), k))
            / len(list(itertools.combinations(range(n), k)))
            for p in problems
        ]
        brute_majority = [brute_force_majority([s.vote for s in p.samples], p.right, k) for p in problems]
        assert metrics[f"pass_at_{k}"] == pytest.approx(sum(brute_pass) / len(problems))
        assert metrics[f"maj_at_{k}"] == pytest.approx(sum(brute_majority) / len(problems))
    assert metrics["pass_at_1"] == pytest.approx(metrics["accuracy"])
    assert pass_at_k(n, 0, 1) == 0.0


def test_answers_are_grouped_by_math_verify_and_unanswered_samples_abstain():
    answers = [
        r"\boxed{2}",
        r"\boxed{1/2}",
        r"\boxed{0.5}",
        r"\boxed{\frac{1}{2}}",
        r"\boxed{3}",
        "no answer",
        None,
    ]
    correct = [True, False, False, False, False, False, False]
    groups, right = answer_groups(answers, correct)
    assert right == 0 and groups[0] == 0
    assert groups[1] == groups[2] == groups[3] != groups[4]  # one half, however written
    assert groups[4] not in (0, None) and groups[5] is None and groups[6] is None
    assert answer_groups([r"\boxed{3}"], [False]) == ([1], None)  # nobody is right
