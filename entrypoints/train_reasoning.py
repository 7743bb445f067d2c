"""`train_reasoning` entry point: GRPO with N reasoning-vocabulary rows (the experimental arm).

mlflow run . -e train_reasoning -P reasoning_vocab_size=151646
python -m entrypoints.train_reasoning --model tiny-qwen3 --data outputs/data --max_steps 5
"""

import click

from rlvr.cli import friendly_errors, options_from
from rlvr.grpo import REASONING_VOCAB_SIZE, TrainSettings, train


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@options_from(TrainSettings, reasoning_vocab_size=REASONING_VOCAB_SIZE, output_dir="outputs/train_reasoning")
@friendly_errors
def main(**parameters) -> None:
    """Train MODEL on DATA with GRPO, sampling reasoning ids only inside <think>...</think>; log everything to
    MLflow and register the final model."""
    model_uri = train(TrainSettings(**parameters))
    if model_uri:
        click.echo(f"model: {model_uri}")


if __name__ == "__main__":
    main()
