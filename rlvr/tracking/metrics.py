"""A training's metrics: every Trainer log as an MLflow metric, once per step, kept through an outage of the
tracking server and logged by the rerun.

A training first reaches its next checkpoint when the server stops answering, keeping what it could not log
in a file the job names, so the rerun continues the run with every step once.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from transformers import TrainerCallback

from rlvr.tracking.server import TrackingUnavailable, reason, server_uri, unreachable

log = logging.getLogger(__name__)


class Outputs(Protocol):
    """Where a training keeps its files (`rlvr.job.OutputDir` is one): what is asked of it here."""

    @property
    def unlogged(self) -> Path: ...

    def checkpoint(self, step: int) -> Path: ...


class MlflowMetrics(TrainerCallback):
    """Every Trainer log (TRL's rewards, KL, lengths, ours) as MLflow metrics at the global step, from rank 0
    only.

    Each metric appears once per step: a resumed training repeats the steps between its checkpoint and the
    kill, which are already in the run, so they are not logged again; and the Trainer's closing summary
    repeats `epoch` at the last step, which keeps its first value.

    When the server stops answering (a call failed after MLflow's own retries), training goes on without
    calling it to the next checkpoint, one that every process saves anyway, keeping what it could not log in
    the output's `unlogged` file, and stops there with `TrackingUnavailable` (with several processes rank 0
    stops, and the launcher ends the others). The rerun logs the kept records of the steps up to the
    checkpoint it resumes from; later ones are trained, and logged, again.
    """

    def __init__(self, outputs: Outputs):
        self.outputs = outputs
        self.logged_until = 0
        self.last_logged: tuple[int, set[str]] = (-1, set())  # a step and the keys logged at it
        self.outage: str | None = None  # what the first failed call said
        self.outage_step = 0
        self.unlogged: list[dict[str, Any]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        run = mlflow.active_run()
        if state.is_world_process_zero and run is not None:
            history = MlflowClient().get_metric_history(run.info.run_id, "learning_rate")
            self.logged_until = max((m.step for m in history), default=0)
            self._log_kept(resumed_step=state.global_step)

    def _log_kept(self, resumed_step: int) -> None:
        kept = self.outputs.unlogged
        if not kept.exists():
            return
        for record in json.loads(kept.read_text()):
            if record["step"] > resumed_step:
                continue  # after the checkpoint: trained again now, and logged then
            if "table" in record:
                replace_table(pd.DataFrame(record["rows"]), record["table"])
            elif record["step"] > self.logged_until:
                mlflow.log_metrics(record["metrics"], step=record["step"])
        self.logged_until = max(self.logged_until, resumed_step)
        kept.unlink()
        log.info("logged what the last attempt could not, up to step %d", resumed_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or mlflow.active_run() is None:
            return
        if 0 < state.global_step <= self.logged_until:
            return
        metrics = {
            k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if state.global_step != self.last_logged[0]:
            self.last_logged = (state.global_step, set())
        metrics = {k: v for k, v in metrics.items() if k not in self.last_logged[1]}  # the summary: `epoch`
        self.last_logged[1].update(metrics)
        if metrics:
            self._send(
                {"step": state.global_step, "metrics": metrics},
                lambda: mlflow.log_metrics(metrics, step=state.global_step),
            )

    def log_table(self, frame: pd.DataFrame, artifact_file: str, step: int) -> None:
        """`mlflow.log_table`, kept for the rerun during an outage; `step` is the optimizer step under way."""
        self._send(
            {"step": step, "table": artifact_file, "rows": frame.to_dict(orient="records")},
            lambda: replace_table(frame, artifact_file),
        )

    def _send(self, record: dict[str, Any], call: Callable[[], Any]) -> None:
        if self.outage is None:
            try:
                call()
                return
            except MlflowException as error:
                if not unreachable(error):
                    raise
                self.outage = reason(error)
                self.outage_step = record["step"]
                log.warning(
                    "the MLflow tracking server %s stopped answering at step %d; training goes on to its "
                    "next checkpoint, keeping what it cannot log, and stops there",
                    server_uri(),
                    record["step"],
                )
        self.unlogged.append(record)
        kept = self.outputs.unlogged
        partial = kept.with_suffix(".partial")
        partial.write_text(json.dumps(self.unlogged))
        partial.replace(kept)

    def on_save(self, args, state, control, **kwargs):
        if self.outage is not None and state.is_world_process_zero:
            checkpoint = self.outputs.checkpoint(state.global_step)
            raise TrackingUnavailable(
                f"the MLflow tracking server {server_uri()} stopped answering at step {self.outage_step} "
                f"({self.outage}); training stopped at {checkpoint.name} in {checkpoint.parent}, which keeps "
                "what could not be logged: start the server again and rerun the same command to resume."
            )


def replace_table(frame: pd.DataFrame, artifact_file: str) -> None:
    """`mlflow.log_table`, except that a table already in the run is replaced, not appended to.

    A training killed after logging a step's samples regenerates that step when it resumes; the regenerated
    samples are the ones its metrics describe, so they replace the killed process's table.
    """
    run_id = mlflow.active_run().info.run_id
    folder = posixpath.dirname(artifact_file) or None
    if artifact_file in {f.path for f in MlflowClient().list_artifacts(run_id, folder)}:
        mlflow.log_text(frame.to_json(orient="split", index=False, date_format="iso"), artifact_file)
    else:
        mlflow.log_table(data=frame, artifact_file=artifact_file)
