"""`preprocess` entry point: turn a math dataset into the train/test parquet that training and evaluation
read.

mlflow run . -e preprocess -P source=agentica-org/DeepScaleR-Preview-Dataset -P output_dir=outputs/data
python -m entrypoints.preprocess --source synthetic --output_dir outputs/data
"""

from __future__ import annotations

import click
import mlflow

from rlvr.cli import friendly_errors
from rlvr.preprocess import (
    DEFAULT_OUTPUT_DIR,
    DEFAULT_SOURCE,
    DROP_REASONS,
    FILE_FORMATS,
    Options,
    log_preprocess,
    preprocess,
)

DEFAULTS = Options()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--source",
    default=DEFAULT_SOURCE,
    show_default=True,
    help=f"A hub dataset id, a local {'/'.join(FILE_FORMATS)} file, or 'synthetic' with optional knobs, e.g. "
    "synthetic:count=20000,digits=3,max_ops=3 (also min_ops, operations, factor_digits, negative).",
)
@click.option("--split", default=DEFAULTS.split, show_default=True, help="Split of a hub dataset to read.")
@click.option(
    "--config",
    default=DEFAULTS.config,
    help="Configuration (subset) of a hub dataset, e.g. 'main' for gsm8k.",
)
@click.option(
    "--revision", default=DEFAULTS.revision, help="Revision (branch, tag or commit) of a hub dataset."
)
@click.option(
    "--output_dir",
    default=DEFAULT_OUTPUT_DIR,
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory that receives train.parquet and test.parquet.",
)
@click.option(
    "--test_size",
    default=DEFAULTS.test_size,
    show_default=True,
    type=float,
    help="Held-out test rows: a fraction below 1, a row count from 1 up, 0 for none.",
)
@click.option(
    "--max_samples",
    default=DEFAULTS.max_samples,
    show_default=True,
    type=int,
    help="Keep at most this many usable rows (0: all).",
)
@click.option(
    "--seed",
    default=DEFAULTS.seed,
    show_default=True,
    type=int,
    help="Seed of the shuffle and of 'synthetic'.",
)
@click.option(
    "--system_prompt",
    default=DEFAULTS.system_prompt,
    help="System message put before each problem (none if empty).",
)
@click.option(
    "--instruction",
    default=DEFAULTS.instruction,
    show_default=True,
    help="Appended to each problem after a space (none if empty).",
)
@click.option(
    "--max_invalid_fraction",
    default=DEFAULTS.max_invalid_fraction,
    show_default=True,
    type=float,
    help="Fail when more than this fraction of rows lacks a problem or a parseable answer.",
)
@click.option(
    "--problem_field",
    default=DEFAULTS.problem_field,
    help="Column holding the problem (text or chat messages).",
)
@click.option("--answer_field", default=DEFAULTS.answer_field, help="Column holding the final answer.")
@click.option("--reference_field", default=DEFAULTS.reference_field, help="Column holding a worked solution.")
@click.option(
    "--id_field",
    default=DEFAULTS.id_field,
    help="Column holding a unique row id (else a hash of the problem).",
)
@friendly_errors
def main(source: str, output_dir: str, **parameters) -> None:
    """Normalise a math dataset into train.parquet and test.parquet with columns id, source, prompt (chat
    messages), solution (the final answer the reward checks) and reference (a worked solution, or empty).

    Columns are detected from common names (problem/question/prompt/messages;
    answer/final_answer/ground_truth; or the last \\boxed{} of a worked solution); the *_field options
    override them. Rows without a problem or a math-verify-parseable answer, and repeated problems, are
    dropped and counted. Everything is logged to an MLflow run: parameters, row counts, the parquet files and
    each split as a dataset input.
    """
    with mlflow.start_run():
        result = preprocess(source, output_dir, Options(**parameters))
        data_uri = log_preprocess(result, {"source": source, "output_dir": output_dir, **parameters})
    report = result.report
    click.echo(
        f"{report.read} rows read: {report.train} train, {report.test} test, {sum(report.dropped.values())} "
        "dropped"
    )
    for reason in DROP_REASONS:
        if report.dropped[reason]:
            click.echo(
                f"  dropped ({reason}): {report.dropped[reason]}, e.g. {report.examples[reason]!r:.80}"
            )
    click.echo(
        f"wrote {', '.join(str(p) for p in result.paths.values())}; training accepts {output_dir} or "
        f"{data_uri}"
    )


if __name__ == "__main__":
    main()
