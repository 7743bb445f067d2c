"""Which runs and checkpoints an analysis reads, and the held-out prompts it measures them on.

A run is named by `runs:/<run_id>` or by its output_dir; either way analyze gets its MLflow run and its
complete checkpoints, at most `max_checkpoints` of them, evenly spaced. Every output table starts with the
`KEY` columns, which say whose checkpoint a row is about.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rlvr.dataset import Split, load_split
from rlvr.errors import InputError
from rlvr.job import OutputDir
from rlvr.tracking.uris import RUNS_SCHEME, refuse_deleted_run

KEY = ("run", "run_id", "label", "arm", "step")  # the leading columns of every table: whose checkpoint


@dataclass(frozen=True)
class TrainingRun:
    """A run as analyze sees it: its `role` ("training" or "baseline"), MLflow run and checkpoints."""

    role: str
    run: Run
    output_dir: Path
    checkpoints: tuple[tuple[int, Path], ...]

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def arm(self) -> str:
        tags, params = self.run.data.tags, self.run.data.params
        if "rlvr.arm" in tags:
            return tags["rlvr.arm"]
        return "baseline" if params.get("reasoning_vocab_size", "0") in ("0", "0.0") else "reasoning"

    @property
    def label(self) -> str:
        """How figures name the run: its arm and the start of its id."""
        return f"{self.arm} run {self.run_id[:8]}"

    def key(self, step: int) -> dict:
        """The `KEY` columns of a row about this run's checkpoint at `step`."""
        return dict(zip(KEY, (self.role, self.run_id, self.label, self.arm, step), strict=True))


def _get_run(run_id: str, name: str, reference: str) -> Run:
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as error:
        raise InputError(
            f"{name}={reference!r}: MLflow has no run {run_id} ({error.message}); check the id and that "
            "MLFLOW_TRACKING_URI points at the server that holds it."
        ) from error
    refuse_deleted_run(name, reference, run_id)
    return run


def evenly_spaced(items: Sequence, limit: int) -> list:
    """At most `limit` of `items` (0: all), evenly spaced, the first and the last always kept."""
    if not limit or len(items) <= limit:
        return list(items)
    picks = sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})
    return [items[i] for i in picks]


def resolve_run(reference: str, name: str, role: str, max_checkpoints: int = 0) -> TrainingRun:
    """The run behind `runs:/<run_id>` (checkpoints from its recorded output_dir) or behind an output_dir
    (run id from its run record)."""
    reference = reference.strip()
    if reference.startswith(RUNS_SCHEME):
        run_id = reference.removeprefix(RUNS_SCHEME).strip("/")
        if not run_id or "/" in run_id:
            raise InputError(
                f"{name}={reference!r} is not runs:/<run_id>; pass the training run's id alone, no path."
            )
        run = _get_run(run_id, name, reference)
        recorded = run.data.params.get("output_dir")
        if not recorded:
            raise InputError(
                f"{name}={reference!r} records no output_dir parameter, so it is no training run; pass the "
                "run of a train_reasoning or train_baseline job."
            )
        output_dir = Path(recorded).expanduser()
        if not output_dir.is_dir():
            raise InputError(
                f"{name}={reference!r} wrote its checkpoints to {recorded!r}, which does not exist here "
                "(a relative path is read from the current directory). Run analyze on the machine that holds "
                f"them, or copy that directory here and pass {name}=<its local path>."
            )
    else:
        output_dir = Path(reference).expanduser()
        record = OutputDir(output_dir).run_record
        if not record.is_file():
            raise InputError(
                f"{name}={reference!r} is neither runs:/<run_id> nor a training output_dir (none has "
                f"{record.name}); pass one of those."
            )
        try:
            run_id = OutputDir(output_dir).recorded_run_id()
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(
                f"{name}={reference!r}: {record} is not a run record ({error}); pass runs:/<run_id> instead."
            ) from error
        run = _get_run(run_id, name, reference)
    outputs = OutputDir(output_dir)
    found = outputs.checkpoints("config.json")
    if len(found) < 2:
        raise InputError(
            f"{name}={reference!r}: {output_dir} holds {len(found)} complete checkpoint(s), and change "
            f"over training needs at least {outputs.start.name} and one more; train with save_steps below "
            "max_steps."
        )
    return TrainingRun(role, run, output_dir, tuple(evenly_spaced(found, max_checkpoints)))


def held_out(training: TrainingRun, given: str, split: str) -> Split:
    """The prompts (and worked solutions) of `split` to measure on: from the `given` data, or else from the
    data the training run read."""
    data = given.strip() or training.run.data.params.get("data", "")
    if not data:
        raise InputError(
            "data is empty and the training run records none; pass data=<preprocess output_dir or URI>."
        )
    try:
        prompts = load_split(data, split)
    except InputError as error:
        if given.strip():
            raise
        raise InputError(
            f"the training run's data is not readable here ({error}); pass data=<held-out prompts>."
        ) from error
    return prompts.require_rows(data)
