"""Model code for MLflow's models-from-code logging of `rlvr.serving.ReasoningLM`."""

import mlflow

from rlvr.serving import ReasoningLM

mlflow.models.set_model(ReasoningLM())
