"""What an MLflow URI names: whether a text is one at all, the run of a `runs:/` URI, the registered model
of a `models:/` URI, and whether the run it names was deleted.

Models, data and evaluations are named by URIs, local paths, hub ids or presets in the same parameter, so
the layers that read them ask here first. This module imports nothing heavy at import time: MLflow is loaded
only to look a run up.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from rlvr.errors import InputError

RUNS_SCHEME = "runs:/"
_URI = re.compile(r"^[A-Za-z][\w+.-]+:/")  # a scheme of two characters or more: `C:/...` is a path
_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))/?$")


class RegisteredModel(NamedTuple):
    """The parts of `models:/<name>@<alias>` or `models:/<name>/<version>` (one of `alias` and `version` is
    None; `version` may be a number, `latest` or a stage name)."""

    name: str
    alias: str | None
    version: str | None


def is_mlflow_uri(text: str) -> bool:
    """Whether `text` is a URI for MLflow to resolve (`runs:/`, `models:/`, `s3://`, ...) rather than a local
    path, a hub id or a preset name."""
    return bool(_URI.match(text))


def run_id_of(uri: str) -> str | None:
    """The run id of a `runs:/<run_id>/...` URI; None for anything else."""
    if not uri.startswith(RUNS_SCHEME):
        return None
    return uri.removeprefix(RUNS_SCHEME).split("/", 1)[0] or None


def registered_model(uri: str) -> RegisteredModel | None:
    """The registered model and alias or version a `models:/` URI names; None for any other text."""
    match = _REGISTERED.match(uri)
    if match is None:
        return None
    return RegisteredModel(match["name"], match["alias"], match["version"])


def refuse_deleted_run(name: str, reference: str, run_id: str | None = None) -> None:
    """Say so when `reference` (a `runs:/<id>/...` URI, or whatever names the run `run_id`) is a deleted run:
    MLflow still serves a deleted run's metadata, and of its artifacts only says it cannot download them."""
    run_id = run_id or run_id_of(reference)
    if not run_id:
        return
    from mlflow.entities import LifecycleStage
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        deleted = MlflowClient().get_run(run_id).info.lifecycle_stage == LifecycleStage.DELETED
    except MlflowException:
        return  # no such run: the caller's own message says what was tried
    if deleted:
        raise InputError(
            f"{name}={reference!r} names run {run_id}, which is deleted; restore it (mlflow runs restore "
            f"--run-id {run_id}) or pass a run that exists."
        )
