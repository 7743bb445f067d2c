"""`preprocess` entry point: turn a math dataset into the train/test parquet that training and evaluation
read.

mlflow run . -e preprocess -P source=agentica-org/DeepScaleR-Preview-Dataset -P output_dir=outputs/data
python -m entrypoints.preprocess --source synthetic --output_dir outputs/data
"""

import click

from rlvr.cli import friendly_errors, options_from
from rlvr.preprocess import PreprocessSettings, run_preprocess


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@options_from(PreprocessSettings)
@friendly_errors
def main(**parameters) -> None:
    """Normalise a math dataset into train.parquet and test.parquet with columns id, source, prompt (chat
    messages), solution (the final answer the reward checks) and reference (a worked solution, or empty).

    Columns are detected from common names (problem/question/prompt/messages;
    answer/final_answer/ground_truth; or the last \\boxed{} of a worked solution); the *_field options
    override them. Rows without a problem or a math-verify-parseable answer, and repeated problems, are
    dropped and counted. Everything is logged to an MLflow run: parameters, row counts, the parquet files and
    each split as a dataset input.
    """
    result, data_uri = run_preprocess(PreprocessSettings(**parameters))
    click.echo(result.report.breakdown())
    paths = ", ".join(str(path) for path in result.paths.values())
    click.echo(f"wrote {paths}; training accepts {parameters['output_dir']} or {data_uri}")


if __name__ == "__main__":
    main()
