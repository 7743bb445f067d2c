"""`evaluate` entry point: score models on held-out math with n samples per problem, and log it to MLflow.

mlflow run . -e evaluate -P model=models:/rlvr@champion -P data=outputs/data
python -m entrypoints.evaluate --model micro --data synthetic:count=50 --num_samples 4 --max_new_tokens 64
"""

import click

from rlvr.cli import friendly_errors, options_from
from rlvr.evaluation import EvalSettings, evaluate


def _ks(metrics: dict[str, float], kind: str) -> str:
    return ", ".join(
        f"{kind}@{name.rsplit('_', 1)[1]} {value:.3f}"
        for name, value in metrics.items()
        if name.startswith(f"{kind}_at_") and not name.endswith(("_ci_low", "_ci_high"))
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@options_from(EvalSettings)
@friendly_errors
def main(**parameters) -> None:
    """Sample NUM_SAMPLES constrained completions per problem of each DATA set from each MODEL, score them
    with math-verify, and log per benchmark avg@n (accuracy, with a 95% interval), pass@k and maj@k, format
    and truncation rates, thought and answer lengths and the reasoning-token share to MLflow, with a samples
    table, an HTML page of the completions and accuracy by thought length; several models are compared
    pairwise with the first."""
    evaluation = evaluate(EvalSettings(**parameters))
    if evaluation is None:  # another process of a multi-process evaluation: the main one reports
        return
    for source, results in evaluation.metrics.items():
        for key, m in results.items():
            click.echo(
                f"{source} on {key}: avg@{m['samples']:.0f} {m['accuracy']:.3f} (95% CI "
                f"{m['accuracy_ci_low']:.3f}-{m['accuracy_ci_high']:.3f}), {_ks(m, 'pass')}, "
                f"{_ks(m, 'maj')}, format {m['format_rate']:.3f}, truncated {m['truncation_rate']:.3f} over "
                f"{m['problems']:.0f} problems"
            )
    reference = next(iter(evaluation.metrics))
    for key, comparisons in evaluation.comparisons.items():
        for other, c in comparisons.items():
            click.echo(
                f"{other} - {reference} on {key}: {c.diff:+.3f} (95% CI {c.ci_low:+.3f} to {c.ci_high:+.3f}, "
                f"p = {c.p_value:.3g}, {c.units} problems)"
            )


if __name__ == "__main__":
    main()
