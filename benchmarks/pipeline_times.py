"""How long each step of finished `main` runs took, and their comparison tables, read back from MLflow.

    python benchmarks/pipeline_times.py --experiments pretrained-seed0,pretrained-seed1

For each experiment: every child run of its newest `main` run (name, status, wall seconds from the run's
start to its end, which includes the `mlflow run` start of the step), the main run's own wall time, and its
`comparison.md`. Reads whatever `MLFLOW_TRACKING_URI` points at.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient


def seconds(run) -> str:
    if not run.info.end_time:
        return "   running"
    return f"{(run.info.end_time - run.info.start_time) / 1000:10.1f}"


def report(client: MlflowClient, experiment_name: str) -> None:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        print(f"## {experiment_name}: no such experiment (main never started there)")
        return
    mains = client.search_runs(
        [experiment.experiment_id], "tags.`rlvr.step` = 'main'", order_by=["attributes.start_time DESC"]
    )
    if not mains:
        print(f"## {experiment_name}: no main run")
        return
    main = mains[0]
    children = client.search_runs(
        [experiment.experiment_id],
        f"tags.`mlflow.parentRunId` = '{main.info.run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    print(f"## {experiment_name}: main {main.info.run_id} {main.info.status}, {seconds(main).strip()} s")
    print(f"{'step':40s} {'status':10s} {'seconds':>10s}")
    for child in children:
        print(f"{child.info.run_name:40s} {child.info.status:10s} {seconds(child)}")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            table = client.download_artifacts(main.info.run_id, "comparison.md", scratch)
            print("\n" + Path(table).read_text())
        except Exception as error:  # an unfinished main has no table; say so and go on
            print(f"(no comparison.md: {type(error).__name__})\n")


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--experiments", required=True, help="comma-separated experiment names")
    args = parser.parse_args()
    client = MlflowClient()
    for name in args.experiments.split(","):
        report(client, name.strip())


if __name__ == "__main__":
    main()
