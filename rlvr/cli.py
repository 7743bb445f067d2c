"""Shared behaviour of the click entry points: one clear line and a non-zero exit for bad input."""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable

import click

from rlvr.errors import InputError


def friendly_errors(command: Callable) -> Callable:
    """Turn `InputError` into click's `Error: <message>` with exit code 1 instead of a traceback.

    Put it outside the `mlflow.start_run()` block: the exception first leaves the run (MLflow marks it FAILED),
    then reaches the user as one sentence.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=os.environ.get("RLVR_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
        try:
            return command(*args, **kwargs)
        except InputError as error:
            raise click.ClickException(str(error)) from error

    return wrapper
