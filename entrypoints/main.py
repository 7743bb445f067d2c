"""`main` entry point (MLflow's default): the whole offline experiment as nested runs.

mlflow run . --env-manager local                 # the demo, minutes on 2 CPU cores
mlflow run . --env-manager local -P scale=ci     # a smoke run of the same pipeline
"""

import click

from rlvr.cli import friendly_errors, options_from
from rlvr.pipeline import PipelineSettings, comparison_table, run_pipeline


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@options_from(PipelineSettings)
@friendly_errors
def main(**parameters) -> None:
    """preprocess (synthetic) -> warmstart (micro) -> train_baseline and train_reasoning -> evaluate all three
    on held-out problems -> a comparison table; the better arm becomes REGISTERED_MODEL_NAME@champion.
    Finished identical steps are reused."""
    outcome = run_pipeline(PipelineSettings(**parameters))
    click.echo(comparison_table(outcome))
    click.echo(f"champion: {outcome.results[outcome.champion]['model']}")


if __name__ == "__main__":
    main()
