"""How a long sampling job shows it is alive: a bar on stderr (problems done, completion tokens/s, time left)
and the same numbers as metrics of the active MLflow run while it works, so the UI shows it too.

The metrics are logged at their step in seconds since the start (`progress/problems_done`,
`progress/completion_tokens` and `progress/completion_tokens_per_s`, `progress/eta_s`, and
`progress/problems`, the total), at the start, every `every_s` seconds and at the end.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

import mlflow
from tqdm import tqdm

PREFIX = "progress"


class Progress:
    """Counts finished samples per problem; a problem is done once all `samples` of it are."""

    def __init__(
        self,
        problems: int,
        samples: int,
        label: str,
        *,
        to_mlflow: bool,
        show: bool = True,
        every_s: float = 30,
    ):
        self.problems, self.samples, self.to_mlflow, self.every_s = problems, samples, to_mlflow, every_s
        interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=problems,
            desc=label,
            unit="problem",
            file=sys.stderr,
            disable=not show,
            mininterval=0.5 if interactive else every_s,
            dynamic_ncols=interactive,
        )
        self.started = self.logged = time.monotonic()
        self.tokens = 0
        self.done = 0
        self._finished: Counter = Counter()
        self._log()

    def finished(self, problem: object, tokens: int) -> None:
        """One sample of `problem` ended after `tokens` completion tokens."""
        self.tokens += tokens
        self._finished[problem] += 1
        if self._finished[problem] == self.samples:
            self.done += 1
            self.bar.update(1)
        self.bar.set_postfix_str(f"{self.rate:,.0f} tok/s", refresh=False)
        if time.monotonic() - self.logged >= self.every_s:
            self._log()

    @property
    def rate(self) -> float:
        return self.tokens / max(time.monotonic() - self.started, 1e-9)

    def eta_s(self) -> float:
        elapsed = time.monotonic() - self.started
        return elapsed / self.done * (self.problems - self.done) if self.done else float("nan")

    def close(self) -> None:
        self._log()
        self.bar.close()

    def _log(self) -> None:
        self.logged = time.monotonic()
        if not self.to_mlflow:
            return
        metrics = {
            f"{PREFIX}/problems": float(self.problems),
            f"{PREFIX}/problems_done": float(self.done),
            f"{PREFIX}/completion_tokens": float(self.tokens),
            f"{PREFIX}/completion_tokens_per_s": self.rate,
        }
        eta = self.eta_s()
        if eta == eta:  # not NaN: some problem is done
            metrics[f"{PREFIX}/eta_s"] = eta
        mlflow.log_metrics(metrics, step=int(self.logged - self.started))
