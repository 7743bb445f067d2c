"""The tracking server: whether it answers and accepts the login before any work, how it is shown, and how
an outage mid-job is recognised and reported.

Credentials come from MLflow's own variables and are never shown: messages name the variables to fix, and the
URI is shown without any user or password written into it. A server that stops answering mid-job (after
MLflow's own retries) ends the job with one line (`TrackingUnavailable`) instead of a traceback.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rlvr.errors import InputError, UserFacingError


class TrackingUnavailable(UserFacingError):
    """The tracking server stopped answering mid-job; reported in one line, and a rerun resumes."""


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


def reason(error: BaseException) -> str:
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
        cause = getattr(error, "reason", error)
        raise InputError(
            f"the MLflow tracking server {shown} is unreachable ({cause}); start it (mlflow server ...) or "
            "point MLFLOW_TRACKING_URI at a running server."
        ) from error
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as error:
        status = error.get_http_status_code()
        if status not in (401, 403):
            raise
        # The server's response adds nothing to the sentence, so it is left out of the chain.
        raise InputError(_refused(shown, status)) from None


def _refused(shown: str, status: int) -> str:
    """Why the server said no, naming the variables to fix and never their values."""
    if os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        # MLflow sends a username and password in preference to a token.
        given = "the credentials in MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
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


def stopped_answering(error: BaseException) -> TrackingUnavailable:
    """The one line that ends a job whose server stopped answering."""
    return TrackingUnavailable(
        f"the MLflow tracking server {server_uri()} stopped answering ({reason(error)}); start it again and "
        "rerun the same command: a training resumes from its last checkpoint into the same run."
    )


@contextmanager
def one_quick_attempt() -> Iterator[None]:
    """MLflow calls in the block try once, for 5 seconds, instead of waiting through MLflow's retries."""
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
