"""Run MLflow Project entry points as SLURM batch jobs: `mlflow run . --backend slurm --backend-config
slurm.json`.

`backend` is what MLflow loads (through the `mlflow.project_backend` entry point); `job` is what runs inside
the allocation; `config` reads the backend config; `cluster` talks to SLURM's commands.
"""
