"""A run's parameters: logged once each, nested settings flattened to dotted names, values cut to MLflow's
length limit.

MLflow refuses to change a parameter, and `mlflow run` has already logged the entry point's own parameters
as typed on the command line, so only the ones not yet on the run are logged: those keep their text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

MAX_PARAM_LENGTH = 6000
_BATCH = 100  # parameters per request: MLflow's limit for one `log_params` call


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
    """Log the params (nested mappings as `outer.inner`) that the active run does not have yet."""
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params
    items = [(k, v) for k, v in _flatten(params).items() if k not in existing]
    for start in range(0, len(items), _BATCH):
        mlflow.log_params(dict(items[start : start + _BATCH]))
