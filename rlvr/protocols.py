"""The numbers evaluation protocols report from n scored samples per problem, each a per-problem value in
[0, 1] averaged over problems, with an interval over problems:

- avg@n: the share of correct samples (DeepScaleR's "pass@1 averaged over 16 samples");
- pass@k: the chance that at least one of k samples is correct, estimated without bias from all n (Chen et
  al.'s 1 - C(n-c, k) / C(n, k)); pass@1 equals avg@n;
- maj@k: the chance that the majority answer of k samples is correct (equal answers grouped, ties broken
  uniformly, samples without an answer abstaining), averaged over every k-subset of the n samples, so that it
  too uses all of them; maj@1 equals avg@n when every sample has an answer.

Problems are the independent units: samples of one problem are correlated, so intervals count problems.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

Z_95 = 1.959963984540054


def ladder(samples: int) -> list[int]:
    """The k at which pass@k and maj@k are reported by default: 1, 2, 4, ... below `samples`, then
    `samples`."""
    ks = [1 << i for i in range(samples.bit_length()) if 1 << i < samples]
    return [*ks, samples]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of the chance that at least one of k samples is correct, from c correct among n >= k.

    1 - C(n-c, k) / C(n, k), written as a product of ratios so that no binomial coefficient is formed: large n
    neither overflows nor loses precision.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_at_k(votes: Sequence[int | None], correct: int | None, k: int) -> float:
    """The chance that a majority vote over k of the samples, chosen uniformly among all k-subsets, picks the
    correct answer. `votes[i]` is sample i's answer group (None: it gave no answer, and abstains); `correct`
    is the group of the right answer (None: no sample has it). A tie at the top is broken uniformly, so a
    correct group tied with t others counts 1 / (t + 1); a subset without votes is wrong.

    Exact, by counting subsets: for each count x of correct votes, the other groups are chosen group by group
    keeping each at most x, tracking how many equal x (the ties); every count is an exact integer.
    """
    n = len(votes)
    if not 1 <= k <= n:
        raise ValueError(f"maj@k needs 1 <= k <= n, got n={n}, k={k}")
    groups = Counter(v for v in votes if v is not None)
    right = groups.pop(correct, 0) if correct is not None else 0
    abstaining = n - right - sum(groups.values())
    total = 0.0
    for x in range(1, min(right, k) + 1):
        # ways[s, t]: ways to pick s votes from the wrong groups seen so far, each at most x, t of them at x
        ways = np.zeros((k + 1, len(groups) + 1), dtype=object)
        ways[0, 0] = 1
        for size in groups.values():
            grown = np.zeros_like(ways)
            for y in range(min(size, x) + 1):
                shifted = ways[: k + 1 - y] * math.comb(size, y)
                if y == x:
                    grown[y:, 1:] += shifted[:, :-1]
                else:
                    grown[y:] += shifted
            ways = grown
        for s in range(k - x + 1):
            rest = k - x - s
            if rest > abstaining:
                continue
            chosen = math.comb(right, x) * math.comb(abstaining, rest)
            total += sum(float(chosen * ways[s, t]) / (t + 1) for t in range(len(groups) + 1) if ways[s, t])
    return total / math.comb(n, k)


def wilson_interval(mean: float, count: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for the mean of `count` independent values in [0, 1] (95% by default).

    The independent units are problems, not samples: samples of one problem are correlated. With k = 1 this is
    the classic Wilson interval of a proportion. With k > 1 each problem contributes its share of correct
    samples; any value in [0, 1] with mean p has variance at most p(1 - p), so using that bound keeps the
    interval valid (conservative) whatever the correlation. Unlike a normal or bootstrap interval it does not
    collapse to a point at accuracy 0 or 1.
    """
    spread = z * z / count
    centre = (mean + spread / 2) / (1 + spread)
    half = z / (1 + spread) * math.sqrt(mean * (1 - mean) / count + spread / (4 * count))
    return max(0.0, centre - half), min(1.0, centre + half)


def with_interval(name: str, values: Sequence[float]) -> dict[str, float]:
    """`name`: the mean of per-problem `values` in [0, 1], with `name_ci_low`/`name_ci_high` (Wilson, over
    problems)."""
    mean = float(sum(values) / len(values))
    low, high = wilson_interval(mean, len(values))
    return {name: mean, f"{name}_ci_low": low, f"{name}_ci_high": high}
