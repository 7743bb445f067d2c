"""The run of an invocation, from start to end: which run it is, in which experiment, and how it ends.

`mlflow run` creates the run and passes its id in `MLFLOW_RUN_ID`; `mlflow.start_run()` adopts it, and a run
started by `python -m entrypoints...` is created here instead. An entry point with an experiment of its own
(`main`: `rlvr-demo`) uses it unless the user named one, leaving the run `mlflow run` made in `Default` as a
pointer. A training restarted after a crash continues its first run, whose id the job keeps beside its
checkpoints. Every run carries the process filling it, so that one left RUNNING by a killed process is closed
later.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import LifecycleStage
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rlvr.errors import InputError
from rlvr.tracking.server import (
    TrackingUnavailable,
    check_tracking_server,
    one_quick_attempt,
    stopped_answering,
    unreachable,
)

log = logging.getLogger(__name__)

STEP_KEY = "rlvr.step_key"  # tag of a run `main` made for a step: the step's entry point, parameters and code
RESUMED_INTO = "rlvr.resumed_into"  # tag of a run `mlflow run` made for a restart: the run resumed
MOVED_TO = "rlvr.moved_to"  # tag of a run `mlflow run` made in `Default`: the run that did the work elsewhere
DEFAULT_EXPERIMENT_ID = "0"  # MLflow's `Default` experiment, where runs land when nobody names one
PROCESS = "rlvr.process"  # tag: `<host>/<pid>` of the process that is filling the run


@contextmanager
def _ended_on_exit(run: mlflow.ActiveRun) -> Iterator[mlflow.ActiveRun]:
    """End `run` as `mlflow.start_run()`'s context does, FINISHED or FAILED, except after an outage.

    With the server gone, ending the run would wait through MLflow's retries again: one quick attempt is
    made (the run is FAILED if the server is already back, else stays RUNNING, as after a kill), and the job
    ends with one line.
    """
    try:
        yield run
    except BaseException as error:
        if isinstance(error, TrackingUnavailable) or unreachable(error):
            with one_quick_attempt():
                try:
                    mlflow.end_run("FAILED")
                except MlflowException:
                    pass  # still down: the run stays RUNNING, and the rerun takes it over
            if isinstance(error, TrackingUnavailable):
                raise
            raise stopped_answering(error) from error
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run()


def experiment_in_environment() -> bool:
    """Whether the environment names an experiment (`MLFLOW_EXPERIMENT_NAME` or `_ID`).

    `mlflow.set_experiment` sets `MLFLOW_EXPERIMENT_ID`; so does `mlflow run`, for the run it hands on.
    """
    return bool(os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("MLFLOW_EXPERIMENT_ID"))


def _own_experiment(name: str, launched: str | None) -> str | None:
    """The id of experiment `name` (created if missing) where the user named no experiment, else None.

    `mlflow run` gives the entry point the experiment of the run it created, so there only a name in the
    environment or a run outside `Default` shows a choice; `--experiment-id 0` and `--experiment-name Default`
    look like no choice (`MLFLOW_EXPERIMENT_NAME=Default` keeps a run there).
    """
    client = MlflowClient()
    if launched:
        if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
            return None
        if client.get_run(launched).info.experiment_id != DEFAULT_EXPERIMENT_ID:
            return None
    elif experiment_in_environment():
        return None
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # another run created it meanwhile
            if experiment is None:
                raise
    if experiment.lifecycle_stage != LifecycleStage.ACTIVE:
        raise InputError(
            f"the MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}) or name another one with MLFLOW_EXPERIMENT_NAME."
        )
    return experiment.experiment_id


def _leave_pointer(launched: str, run: mlflow.ActiveRun, run_name: str | None, experiment: str) -> None:
    """Turn the run `mlflow run` created into a pointer to `run`, which does the work in `experiment`.

    MLflow cannot move a run between experiments, and `mlflow run` fails if its run is deleted; it closes the
    pointer itself when the command ends (FINISHED, or FAILED with the real run). The pointer carries this
    process too, so that one left RUNNING by a killed `mlflow run` is closed as an orphan later.
    """
    client = MlflowClient()
    origin = {
        k: v
        for k, v in client.get_run(launched).data.tags.items()
        if k.startswith(("mlflow.source.", "mlflow.project."))
    }
    if origin:  # the real run shows the same project, entry point and commit
        mlflow.set_tags(origin)
    client.set_tag(launched, MOVED_TO, run.info.run_id)
    client.set_tag(launched, PROCESS, this_process())
    client.set_tag(launched, "mlflow.runName", f"{run_name or 'run'} (in experiment {experiment})")
    log.info(
        "MLflow run %s in experiment %s (the run %s in Default points to it)",
        run.info.run_id,
        experiment,
        launched,
    )


@contextmanager
def _current_experiment(experiment_id: str | None) -> Iterator[None]:
    """Make `experiment_id` (if given) the experiment that MLflow's fluent calls without one use, such as
    `mlflow.load_table` and `mlflow.search_runs`, while the block runs."""
    if experiment_id is None:
        yield
        return
    previous = os.environ.get("MLFLOW_EXPERIMENT_ID")
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MLFLOW_EXPERIMENT_ID"]
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = previous


@contextmanager
def entrypoint_run(
    run_name: str | None = None, tags: Mapping[str, str] | None = None, default_experiment: str | None = None
) -> Iterator[mlflow.ActiveRun]:
    """The run of this invocation: the one `mlflow run` created, else a new one. FAILED if the body raises.

    A run that `mlflow run` created with a random name is renamed `run_name`; one that `main` created for a
    step (tagged `rlvr.step_key`) keeps the name `main` gave it. With `default_experiment`, an invocation for
    which the user named no experiment runs in that one: a run `mlflow run` created in `Default` stays as a
    pointer, named `<run_name> (in experiment <name>)` and tagged `rlvr.moved_to`.
    """
    check_tracking_server()
    launched = os.environ.get("MLFLOW_RUN_ID")
    experiment_id = _own_experiment(default_experiment, launched) if default_experiment else None
    moved = bool(launched) and experiment_id is not None
    if moved:
        del os.environ["MLFLOW_RUN_ID"]  # else start_run would adopt it
    adopted = bool(launched) and not moved
    with (
        _current_experiment(experiment_id),
        _ended_on_exit(
            mlflow.start_run(run_name=None if adopted else run_name, experiment_id=experiment_id)
        ) as run,
    ):
        if moved:
            _leave_pointer(launched, run, run_name, default_experiment)
        if adopted and run_name and STEP_KEY not in run.data.tags:
            mlflow.set_tag("mlflow.runName", run_name)
        mlflow.set_tags({**(tags or {}), PROCESS: this_process()})
        close_orphans(run.info.experiment_id)
        if moved:
            close_orphans(DEFAULT_EXPERIMENT_ID)  # pointers of earlier invocations killed with `mlflow run`
        yield run


@contextmanager
def resumable_run(
    resumed_run_id: str | None, run_name: str | None = None, tags: Mapping[str, str] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """`entrypoint_run`, except that a training resuming into `resumed_run_id` (its first run) reopens it.

    A restart launched by `mlflow run` arrives with a fresh run of its own, which `mlflow run` closes when the
    command ends; it is left as a pointer, tagged `rlvr.resumed_into` and named for the run it was folded
    into, and loses its `rlvr.step_key` so `main` never reuses it. The training's metrics stay in the first
    run.
    """
    if resumed_run_id is None:
        with entrypoint_run(run_name, tags) as run:
            yield run
        return
    check_tracking_server()
    fresh = os.environ.pop("MLFLOW_RUN_ID", None)
    if fresh and fresh != resumed_run_id:
        client = MlflowClient()
        client.set_tag(fresh, RESUMED_INTO, resumed_run_id)
        client.set_tag(fresh, "mlflow.runName", f"{run_name or 'run'} (resumed in {resumed_run_id})")
        if STEP_KEY in client.get_run(fresh).data.tags:
            client.delete_tag(fresh, STEP_KEY)
        log.info("resuming MLflow run %s; the new run %s points to it", resumed_run_id, fresh)
    with _ended_on_exit(mlflow.start_run(run_id=resumed_run_id)) as run:
        mlflow.set_tag(PROCESS, this_process())
        yield run


def this_process() -> str:
    """`<host>/<pid>`: which process is filling a run, as the `rlvr.process` tag records it."""
    return f"{socket.gethostname()}/{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process nobody reaped yet is a zombie: dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def close_orphans(experiment_id: str) -> None:
    """Mark KILLED the RUNNING runs of this host whose process is gone (a SIGKILL, an OOM kill, a lost node).

    A killed training is still resumed into its run later (resuming sets it RUNNING again); runs of other
    hosts are left alone, since their processes cannot be checked from here.
    """
    host = socket.gethostname()
    client = MlflowClient()
    running = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{PROCESS}` LIKE '{host}/%'"
    )
    for run in running:
        owner = run.data.tags[PROCESS]
        pid = owner.rsplit("/", 1)[1]
        if owner.rsplit("/", 1)[0] == host and pid.isdigit() and not _alive(int(pid)):
            log.info(
                "run %s was left RUNNING by process %s, which is gone; marking it KILLED",
                run.info.run_id,
                owner,
            )
            client.set_terminated(run.info.run_id, "KILLED")
