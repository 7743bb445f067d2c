"""Warm start: supervised fine-tuning on worked solutions with TRL's `SFTTrainer`.

GRPO only learns from groups whose rewards differ; a random policy on an offline preset never answers right,
so every group is flat. Fine-tuning on preprocess's `reference` column (for the synthetic task, worked
solutions in the `<think>...</think> ... \\boxed{}` format) gives GRPO a policy with non-zero reward to start
from. The warm start is a baseline model (N = 0); `train_reasoning` grows its reasoning rows from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rlvr.errors import InputError, flag, require_at_least_one
from rlvr.job import TrainerSetup, run_job
from rlvr.settings import check_schedule, param, trainer_arguments


@dataclass
class WarmstartSettings:
    """Every parameter of the warmstart entry point, with its one default. The code both trainers share reads
    the ones `rlvr.settings.TrainerSettings` names."""

    model: str = param("micro", "hub id, local directory, preset or MLflow model URI to fine-tune")
    data: str = param("outputs/data", "preprocess output with a reference column: output_dir or runs:/ URI")
    learning_rate: float = param(1.2e-3, "peak learning rate")
    num_train_epochs: float = param(1.0, "passes over the worked solutions (ignored when max_steps > 0)")
    max_steps: int = param(2200, "optimizer steps to run (-1: from num_train_epochs)")
    per_device_train_batch_size: int = param(16, "examples per device per micro-batch")
    gradient_accumulation_steps: int = param(1, "micro-batches per optimizer step")
    max_length: int = param(512, "examples are truncated to this many tokens")
    seed: int = param(42, "random seed")
    bf16: str = param("auto", "bf16 autocast: true, false or auto (on when a GPU supports it)")
    gradient_checkpointing: str = param(
        "false", "recompute activations in backward (less memory, slower): true or false"
    )
    save_steps: int = param(200, "save a checkpoint every this many optimizer steps")
    output_dir: str = param(
        "outputs/warmstart", "checkpoints go here; rerunning with the same directory resumes"
    )
    registered_model_name: str = param(
        "rlvr-warmstart", "register the final model under this name ('' to skip)"
    )


def _sft_dataset(frame, data: str) -> Dataset:
    """Conversational prompt-completion pairs; TRL then computes the loss on the completion only."""
    usable = frame[frame["reference"].str.len() > 0]
    if usable.empty:
        raise InputError(
            f"data {data!r} has no worked solutions (its reference column is empty); warm-start on a source "
            "with references, e.g. preprocess source=synthetic."
        )
    return Dataset.from_list(
        [
            {
                "prompt": [dict(m) for m in row.prompt],
                "completion": [{"role": "assistant", "content": row.reference}],
            }
            for row in usable.itertuples()
        ]
    )


def warmstart(settings: WarmstartSettings) -> str | None:
    """Fine-tune as `settings` say; returns the logged model's URI (None on ranks other than 0)."""
    require_at_least_one(
        settings, "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "save_steps"
    )
    check_schedule(settings)
    flag("gradient_checkpointing", settings.gradient_checkpointing)  # a bad value fails here

    def prepare(frame: pd.DataFrame, model, tokenizer) -> TrainerSetup:
        dataset = _sft_dataset(frame, settings.data)
        config = SFTConfig(
            **trainer_arguments(settings, SFTConfig),
            max_length=settings.max_length,
            lr_scheduler_type="cosine",
            warmup_steps=10,
            logging_steps=5,
            report_to=[],
        )
        return TrainerSetup(
            config=config,
            dataset=dataset,
            trainer=SFTTrainer,
            params={},
            config_key="sft",
            data_metrics={"data/train_examples": len(dataset)},
        )

    return run_job(
        settings,
        step="warmstart",
        arm="baseline",
        model_arm="warmstart",
        reasoning_vocab_size=0,
        prepare=prepare,
    )
