"""The model registry and the logged models behind URIs: every look-up and change of them, one function each.

Training registers its final model (`register`); `main` finds the version each step registered
(`version_registered_by`) and points the `champion` alias at the better arm (`set_alias`); evaluation finds
the version and the logged model a URI names (`version_named_by`, `logged_model_id`) and records itself on
the version (`tag_version`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rlvr.errors import InputError
from rlvr.tracking.uris import is_mlflow_uri, registered_model

log = logging.getLogger(__name__)


def register(model_uri: str, name: str, tags: Mapping[str, str]) -> str:
    """Register the logged model at `model_uri` as a new version of `name`, tagged; returns its
    `models:/<name>/<version>` URI."""
    registered = mlflow.register_model(model_uri, name, tags=dict(tags))
    log.info("registered %s version %s", name, registered.version)
    return f"models:/{name}/{registered.version}"


def version_registered_by(run_id: str, name: str) -> str:
    """The newest version of `name` that run `run_id` registered (a training step of `main`)."""
    versions = MlflowClient().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not versions:
        raise InputError(f"run {run_id} registered no version of {name}; check its training log.")
    return max(versions, key=lambda v: int(v.version)).version


def version_named_by(uri: str) -> ModelVersion | None:
    """The version behind `models:/name@alias`, `models:/name/<N>` or `models:/name/latest`; None for any
    other name (a stage name included: it is linked through its logged model only)."""
    named = registered_model(uri)
    if named is None:
        return None
    client = MlflowClient()
    if named.alias:
        return client.get_model_version_by_alias(named.name, named.alias)
    if named.version.isdigit():
        return client.get_model_version(named.name, named.version)
    if named.version.lower() == "latest":
        return max(client.search_model_versions(f"name='{named.name}'"), key=lambda v: int(v.version))
    return None


def logged_model_id(uri: str) -> str | None:
    """The MLflow LoggedModel behind an MLflow URI; None for presets, directories and hub ids."""
    if not is_mlflow_uri(uri):
        return None
    try:
        return mlflow.models.get_model_info(uri).model_id
    except MlflowException:
        return None  # a plain Hugging Face directory logged as artifacts has no MLmodel


def tag_version(version: ModelVersion, key: str, value: str) -> None:
    MlflowClient().set_model_version_tag(version.name, version.version, key, value)


def set_alias(name: str, alias: str, version: str) -> None:
    """Point `models:/<name>@<alias>` at `version`."""
    MlflowClient().set_registered_model_alias(name, alias, version)
