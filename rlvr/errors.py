"""The errors an entry point reports to the user as one line instead of a traceback, and the checks of input
that raise them.

`UserFacingError` is every such error: its message is one sentence that says what happened and what to do,
and `rlvr.cli` prints it with a non-zero exit. `InputError` is the one for bad input, whose message names the
input and the fix; a tracking server that stops answering mid-job and a training that diverges are reported
the same way without being bad input, so they derive from `UserFacingError` alone.
"""

import dataclasses
import math


class UserFacingError(Exception):
    """An error whose message is one sentence for the user, printed without a traceback."""


class InputError(UserFacingError, ValueError):
    """Input that cannot be used as given (a parameter, file, model name, URI); the message says how to fix
    it."""


_SWITCH = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False, "auto": None}


def switch(value: object, auto: bool = True) -> bool | None:
    """A yes/no value written as text (MLproject parameters and source options have no boolean type): true, 1
    or yes; false, 0 or no; and, where `auto`, "auto" for None. Anything else raises ValueError."""
    lowered = str(value).strip().lower()
    if lowered not in _SWITCH or (lowered == "auto" and not auto):
        raise ValueError(f"{value!r} is not a switch")
    return _SWITCH[lowered]


def flag(name: str, value: str) -> bool | None:
    """A true/false/auto parameter; None means auto."""
    try:
        return switch(value)
    except ValueError:
        raise InputError(f"{name}={value!r} is not a switch; use true, false or auto.") from None


def require_at_least_one(settings: object, *names: str) -> None:
    """Refuse a count or size parameter below 1, naming it."""
    for name in names:
        if getattr(settings, name) < 1:
            raise InputError(f"{name}={getattr(settings, name)} must be at least 1.")


def require_finite(settings: object, *names: str) -> None:
    """Refuse a NaN or infinite float field of a settings dataclass, naming it and its default: click and
    MLflow both read `nan` and `inf` as floats, which would only fail (or poison training) much later."""
    defaults = {spec.name: spec.default for spec in dataclasses.fields(settings)}
    for name in names:
        value = getattr(settings, name)
        if not math.isfinite(value):
            raise InputError(
                f"{name}={value} is not a finite number; pass a finite value, e.g. the default "
                f"{defaults[name]}."
            )
