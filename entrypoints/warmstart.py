"""`warmstart` entry point: supervised fine-tuning on worked solutions, so GRPO starts with non-zero reward.

mlflow run . -e warmstart -P model=micro -P data=outputs/data
python -m entrypoints.warmstart --model micro --data outputs/data --max_steps 200
"""

import click

from rlvr.cli import friendly_errors, options_from
from rlvr.sft import WarmstartSettings, warmstart


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@options_from(WarmstartSettings)
@friendly_errors
def main(**parameters) -> None:
    """Fine-tune MODEL on the reference (worked solution) column of DATA with TRL's SFTTrainer; log everything
    to MLflow and register the result."""
    model_uri = warmstart(WarmstartSettings(**parameters))
    if model_uri:
        click.echo(f"model: {model_uri}")


if __name__ == "__main__":
    main()
