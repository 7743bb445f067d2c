"""MLflow plumbing shared by the entry points, one concept per module.

- `uris`: whether a name is an MLflow URI, the run and the registered model it names; no heavy imports, so
  the data and model layers can ask it without loading MLflow.
- `server`: the tracking server's health, its credentials, and how an outage is reported.
- `runs`: one run per invocation (the one `mlflow run` created, a pointer left in `Default`, a resumed
  training's first run, orphans of killed processes).
- `params`: parameters logged once, flattened and cut to MLflow's limits.
- `metrics`: the Trainer's logs as metrics, held back through an outage and logged by the rerun.
- `registry`: every look-up and change of registered model versions and logged models.

Credentials come from MLflow's own variables (`MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD`,
`MLFLOW_TRACKING_TOKEN`) and are never logged, printed or written by rlvr. Logging a trained model as a pyfunc
belongs to the served model (`rlvr.serving`), which registers it here.
"""
