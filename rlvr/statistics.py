"""Paired comparisons of two models scored on the same problems: the mean per-problem difference in accuracy,
a bootstrap 95% interval over problems, and a sign-flip permutation p-value.

Problems are the independent units (samples of one problem are correlated), so each problem contributes one
difference: its share of correct samples under model B minus that under model A. With several seeds (an index
level named `seed`), each seed's models are paired on the same problems and a problem's differences are
averaged over the seeds before resampling: the seeds share the problems, so treating (seed, problem) pairs as
independent would understate the spread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from rlvr.errors import InputError

RESAMPLES = 10_000
_CHUNK = 2_000_000  # bootstrap indices drawn per chunk, to bound memory for many problems


@dataclass(frozen=True)
class Paired:
    """B minus A: the mean per-unit difference with its 95% interval and the two-sided p-value of no
    difference."""

    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    units: int  # problems

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {
            prefix: self.diff,
            f"{prefix}_ci_low": self.ci_low,
            f"{prefix}_ci_high": self.ci_high,
            f"{prefix}_p_value": self.p_value,
        }


def per_problem_accuracy(samples: pd.DataFrame, verdict: str = "correct") -> pd.Series:
    """Share of correct samples per problem, indexed by (dataset, id), from an evaluation's samples table;
    `verdict` names the column that judges a sample (`correct`, or `lenient_correct`)."""
    return samples.groupby(["dataset", "id"])[verdict].mean()


def paired(a: pd.Series, b: pd.Series, seed: int = 0, resamples: int = RESAMPLES) -> Paired:
    """Compare B with A over the units (index entries) both were scored on; refuses unmatched units."""
    if set(a.index) != set(b.index):
        missing = sorted(set(a.index) ^ set(b.index))[:3]
        raise ValueError(
            f"the two models were not scored on the same problems (e.g. {missing}); pair like with like"
        )
    require_finite(a, b)
    differences = b - a.reindex(b.index)
    if "seed" in (differences.index.names or ()):
        differences = differences.groupby(level=[n for n in differences.index.names if n != "seed"]).mean()
    differences = differences.to_numpy(dtype=np.float64)
    if differences.size == 0:
        raise ValueError("no problems to compare")
    rng = np.random.default_rng(seed)
    low, high = np.percentile(bootstrap_means(differences, rng, resamples), [2.5, 97.5])
    return Paired(
        diff=float(differences.mean()),
        ci_low=float(low),
        ci_high=float(high),
        p_value=sign_flip_p_value(differences, rng, resamples),
        units=int(differences.size),
    )


def require_finite(*scores: pd.Series) -> None:
    """Refuse a NaN or infinite score: it would pass for a difference (NaN != 0) that no sign flip ever
    reaches, or vanish from a mean over seeds, and the result would look like evidence."""
    bad = [key for series in scores for key, value in series.items() if not np.isfinite(value)]
    if bad:
        raise InputError(
            f"the scores to compare are not all finite numbers (NaN or infinity for {bad[:3]}); score every "
            "problem, or leave the unscored ones out of every model."
        )


def mean_interval(values: pd.Series, seed: int = 0, resamples: int = RESAMPLES) -> tuple[float, float]:
    """A bootstrap 95% interval of the mean per-problem value, averaging over a `seed` level first (see
    above)."""
    require_finite(values)
    if "seed" in (values.index.names or ()):
        values = values.groupby(level=[n for n in values.index.names if n != "seed"]).mean()
    low, high = np.percentile(
        bootstrap_means(values.to_numpy(dtype=np.float64), np.random.default_rng(seed), resamples),
        [2.5, 97.5],
    )
    return float(low), float(high)


def bootstrap_means(values: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Means of `resamples` resamples of `values` with replacement."""
    rows = max(1, _CHUNK // values.size)
    means = [
        values[rng.integers(0, values.size, (min(rows, resamples - start), values.size))].mean(1)
        for start in range(0, resamples, rows)
    ]
    return np.concatenate(means)


def sign_flip_p_value(differences: np.ndarray, rng: np.random.Generator, resamples: int) -> float:
    """Two-sided p-value of a zero mean difference: under the null each pair's difference is as likely with
    either sign. Exact (all 2^n sign patterns of the nonzero differences) up to 16 of them, else Monte Carlo
    with the +1 correction, which keeps the test valid."""
    nonzero = differences[differences != 0]
    observed = abs(differences.sum())
    if nonzero.size == 0:
        return 1.0
    if nonzero.size <= 16:
        signs = 1 - 2 * ((np.arange(2**nonzero.size)[:, None] >> np.arange(nonzero.size)) & 1)
        sums = np.abs(signs @ nonzero)
        return float(np.mean(sums >= observed - 1e-12))
    rows = max(1, _CHUNK // nonzero.size)
    hits = 0
    for start in range(0, resamples, rows):
        signs = rng.choice((-1.0, 1.0), size=(min(rows, resamples - start), nonzero.size))
        hits += int((np.abs(signs @ nonzero) >= observed - 1e-12).sum())
    return (hits + 1) / (resamples + 1)
