"""`train_baseline` entry point: GRPO without a reasoning vocabulary (the control arm, N = 0).

mlflow run . -e train_baseline
python -m entrypoints.train_baseline --model tiny-qwen3 --data outputs/data --max_steps 5
"""

import click

from rlvr.cli import friendly_errors, options_from
from rlvr.grpo import TrainSettings, train


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@options_from(TrainSettings, output_dir="outputs/train_baseline", exclude=("reasoning_vocab_size",))
@friendly_errors
def main(**parameters) -> None:
    """Train MODEL on DATA with GRPO and no reasoning vocabulary (the same code path with N = 0); log
    everything to MLflow and register the final model."""
    model_uri = train(TrainSettings(reasoning_vocab_size=0, **parameters))
    if model_uri:
        click.echo(f"model: {model_uri}")


if __name__ == "__main__":
    main()
