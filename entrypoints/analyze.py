"""`analyze` entry point: how a training run's reasoning vocabulary evolved, as plots and tables in MLflow.

mlflow run . -e analyze -P training_run=runs:/<run_id> -P baseline_run=runs:/<baseline_run_id>
python -m entrypoints.analyze --training_run outputs/train_reasoning --baseline_run outputs/train_baseline
"""

import click

from rlvr.analysis import AnalyzeSettings, analyze
from rlvr.cli import friendly_errors, options_from


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@options_from(AnalyzeSettings)
@friendly_errors
def main(**parameters) -> None:
    """Load every checkpoint of TRAINING_RUN (and BASELINE_RUN) and log, as artifacts of a new MLflow
    run linked to them: the share of thought tokens that are reasoning ids, the drift of the reasoning rows
    from their standard twins (all rows, and a few token families in PCA), the next-token entropy inside
    thoughts, and a completion rendered with its reasoning tokens coloured."""
    run_id = analyze(AnalyzeSettings(**parameters))
    click.echo(f"analysis: runs:/{run_id}")


if __name__ == "__main__":
    main()
