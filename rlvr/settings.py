"""How a settings dataclass declares a parameter: its one default, and the help that its click option and
MLproject parameter show (`cli.options_from` reads both).

It sits with the shared modules so that a settings dataclass of any layer (preprocessing, training,
evaluation, the pipeline) can use it without importing another layer.
"""

from dataclasses import field
from typing import Any


def param(default: Any, help: str) -> Any:
    """A settings field with the help text its click option and MLproject parameter show."""
    return field(default=default, metadata={"help": help})
