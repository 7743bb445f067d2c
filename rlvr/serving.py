"""The MLflow pyfunc of a trained model: prompts in, constrained completions out.

Logged as "models from code": `rlvr/pyfunc_model.py` names this class, the Hugging Face directory (with its
token map) travels as the artifact `model`, and loading goes through `rlvr.load_model`, so a served model
samples under exactly the constraint it was trained with.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd

GENERATION_DEFAULTS = {
    "max_new_tokens": 512,
    "temperature": 0.0,
    "top_p": 1.0,
    "seed": 0,
}  # greedy by default


def _prompts(model_input: Any) -> list:
    if isinstance(model_input, pd.DataFrame):  # MLflow turns a plain list into a one-column frame
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, str):
        return [model_input]
    return list(model_input)


def _check_options(options: dict) -> None:
    """A request's sampling options, refused with a message (the scoring server answers 400) when out of
    range."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    problems = []
    if int(options["max_new_tokens"]) < 1:
        problems.append(f"max_new_tokens={options['max_new_tokens']} must be at least 1")
    if float(options["temperature"]) < 0:
        problems.append(f"temperature={options['temperature']} must be 0 (greedy) or positive")
    if not 0 < float(options["top_p"]) <= 1:
        problems.append(f"top_p={options['top_p']} must be in (0, 1]")
    if problems:
        raise MlflowException("; ".join(problems) + ".", error_code=INVALID_PARAMETER_VALUE)


class ReasoningLM(mlflow.pyfunc.PythonModel):
    """Input: a list of prompts (strings or chat messages) or a DataFrame with a `prompt` column.
    Output: one row per prompt with `completion`, `thought`, `answer` and `reasoning_tokens`."""

    def load_context(self, context) -> None:
        import torch

        from rlvr.models import load_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer = load_model(context.artifacts["model"], device=device)
        self.model.eval()

    def predict(self, context, model_input, params: dict | None = None) -> pd.DataFrame:
        from rlvr.generation import generate

        options = {**GENERATION_DEFAULTS, **(params or {})}
        _check_options(options)
        completions = generate(
            self.model,
            self.tokenizer,
            _prompts(model_input),
            max_new_tokens=int(options["max_new_tokens"]),
            temperature=float(options["temperature"]),
            top_p=float(options["top_p"]),
            seed=int(options["seed"]),
        )
        rows = [
            {
                "completion": c.text,
                "thought": c.thought,
                "answer": c.answer,
                "reasoning_tokens": c.reasoning_tokens,
            }
            for (c,) in completions
        ]
        return pd.DataFrame(rows, columns=["completion", "thought", "answer", "reasoning_tokens"])
