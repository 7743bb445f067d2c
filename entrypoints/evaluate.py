"""`evaluate` entry point: score a model on held-out math with k samples per problem, and log it to MLflow.

mlflow run . -e evaluate -P model=models:/rlvr@champion -P data=outputs/data
python -m entrypoints.evaluate --model micro --data synthetic:count=50 --num_samples 4 --max_new_tokens 64
"""

import click

from rlvr.cli import friendly_errors, options_from
from rlvr.evaluation import EvalSettings, evaluate


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@options_from(EvalSettings)
@friendly_errors
def main(**parameters) -> None:
    """Sample NUM_SAMPLES constrained completions per problem of each DATA set from MODEL, score them with
    math-verify, and log per-dataset accuracy (with a 95% interval), pass@k, format rate, thought and answer
    lengths and the reasoning-token share to MLflow, with a samples table and an HTML page of the
    completions."""
    results = evaluate(EvalSettings(**parameters))
    for key, metrics in results.items():
        passes = ", ".join(
            f"{name.replace('_at_', '@')} {value:.3f}"
            for name, value in metrics.items()
            if name.startswith("pass_at_")
        )
        click.echo(
            f"{key}: accuracy {metrics['accuracy']:.3f} (95% CI {metrics['accuracy_ci_low']:.3f}-"
            f"{metrics['accuracy_ci_high']:.3f}), {passes}, format {metrics['format_rate']:.3f} "
            f"over {metrics['problems']:.0f} problems"
        )


if __name__ == "__main__":
    main()
