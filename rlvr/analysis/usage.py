"""How often thoughts use reasoning ids: in the completions sampled at each checkpoint, and as training itself
logged per step, counted alike so that the two compare.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from mlflow.tracking import MlflowClient

from rlvr.analysis.runs import KEY, TrainingRun
from rlvr.generation import Generated

LOGGED_SHARE = "reasoning/token_share"  # what training logs per step (rlvr.grpo)


def usage(generated: Sequence[Sequence[Generated]]) -> dict[str, float]:
    """Thought tokens of the samples split into reasoning and standard ids, counted as training counts them
    (`<think>` and `</think>` included), so the shares compare with the logged `reasoning/token_share`."""
    flat = [g for samples in generated for g in samples]
    thought = sum(g.thought_tokens for g in flat)
    reasoning = sum(g.reasoning_tokens for g in flat)
    return {
        "completions": len(flat),
        "thought_tokens": thought,
        "reasoning_tokens": reasoning,
        "standard_tokens": thought - reasoning,
        "reasoning_share": reasoning / thought if thought else 0.0,
        "standard_share": (thought - reasoning) / thought if thought else 0.0,
        "closed_thought_rate": sum(g.closed for g in flat) / len(flat),
    }


def logged_shares(runs: Sequence[TrainingRun]) -> pd.DataFrame:
    """The reasoning-token share each run logged per training step (its rollouts, not our samples)."""
    client = MlflowClient()
    records = [
        run.key(m.step) | {"reasoning_share": m.value}
        for run in runs
        for m in client.get_metric_history(run.run_id, LOGGED_SHARE)
    ]
    return pd.DataFrame(records, columns=[*KEY, "reasoning_share"])
