"""Shared behaviour of the click entry points: one clear line and a non-zero exit for an error the user can
act on."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable

import click

from rlvr.errors import UserFacingError


def friendly_errors(command: Callable) -> Callable:
    """Turn a `UserFacingError` into click's `Error: <message>` with exit code 1 instead of a traceback.

    Put it outside the `mlflow.start_run()` block: the exception first leaves the run (MLflow marks it
    FAILED), then reaches the user as one sentence.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        logging.basicConfig(
            level=os.environ.get("RLVR_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s"
        )
        try:
            return command(*args, **kwargs)
        except UserFacingError as error:
            raise click.ClickException(str(error)) from error

    return wrapper


def options_from(settings_class, exclude: tuple[str, ...] = (), **defaults) -> Callable:
    """click options `--<field>` for every field of a settings dataclass, with its default (or the one given
    here).

    Option names keep the underscores of the MLproject parameters, so `-P max_steps=5` and `--max_steps 5`
    name the same thing.
    """

    def decorate(command: Callable) -> Callable:
        for spec in reversed(dataclasses.fields(settings_class)):
            if spec.name in exclude:
                continue
            default = defaults.get(spec.name, spec.default)
            command = click.option(
                f"--{spec.name}",
                type=type(spec.default),
                default=default,
                show_default=True,
                help=spec.metadata.get("help", ""),
            )(command)
        return command

    return decorate
