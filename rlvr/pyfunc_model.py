"""The model code MLflow runs to load a logged model (models from code, `rlvr.serving.log_model`): the pyfunc
`ReasoningLM`.

Only MLflow loads this file; the contract it serves (columns, defaults, option checks) is `rlvr.serving`'s.
"""

import mlflow
import pandas as pd
import torch

from rlvr.generation import generate
from rlvr.models import load_model
from rlvr.serving import COUNT_COLUMN, GENERATION_DEFAULTS, TEXT_COLUMNS, check_options, prompts


class ReasoningLM(mlflow.pyfunc.PythonModel):
    """Input: a list of prompts (strings or chat messages) or a DataFrame with a `prompt` column.
    Output: one row per prompt with `completion`, `thought`, `answer` and `reasoning_tokens`."""

    def load_context(self, context) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer = load_model(context.artifacts["model"], device=device)
        self.model.eval()

    def predict(self, context, model_input, params: dict | None = None) -> pd.DataFrame:
        options = {**GENERATION_DEFAULTS, **(params or {})}
        check_options(options)
        completions = generate(
            self.model,
            self.tokenizer,
            prompts(model_input),
            max_new_tokens=int(options["max_new_tokens"]),
            temperature=float(options["temperature"]),
            top_p=float(options["top_p"]),
            seed=int(options["seed"]),
        )
        rows = [(c.text, c.thought, c.answer, c.reasoning_tokens) for (c,) in completions]
        return pd.DataFrame(rows, columns=[*TEXT_COLUMNS, COUNT_COLUMN])


mlflow.models.set_model(ReasoningLM())
