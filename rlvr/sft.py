"""Warm start: supervised fine-tuning on worked solutions with TRL's `SFTTrainer`.

GRPO only learns from groups whose rewards differ; a random policy on an offline preset never answers right,
so every group is flat. Fine-tuning on preprocess's `reference` column (for the synthetic task, worked
solutions in the `<think>...</think> ... \\boxed{}` format) gives GRPO a policy with non-zero reward to start
from. The warm start is a baseline model (N = 0); `train_reasoning` grows its reasoning rows from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import mlflow
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rlvr import tracking
from rlvr.dataset import load_split
from rlvr.errors import InputError, require_at_least_one
from rlvr.guards import StopOnNonFinite, avoid_cudnn_attention_backward
from rlvr.models import load_model
from rlvr.settings import param
from rlvr.training import Job, bf16_enabled, check_schedule, checkpointing_option


@dataclass
class WarmstartSettings:
    """Every parameter of the warmstart entry point, with its one default."""

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
    checkpointing = checkpointing_option(SFTConfig, settings.gradient_checkpointing)  # a bad value fails here
    avoid_cudnn_attention_backward()
    job = Job(
        settings.output_dir, run_name="warmstart", tags={"rlvr.step": "warmstart", "rlvr.arm": "baseline"}
    )
    split = load_split(settings.data, "train").require_rows(settings.data)
    dataset = _sft_dataset(split.frame, settings.data)
    # the model is loaded before the run starts, so one that cannot be loaded leaves nothing behind
    model, tokenizer = job.starting_model(lambda: load_model(settings.model, 0, seed=settings.seed))
    with job.run():
        if job.main:
            mlflow.log_input(split.mlflow_dataset(), context="train")
        job.save_start(model, tokenizer)
        config = SFTConfig(
            output_dir=settings.output_dir,
            learning_rate=settings.learning_rate,
            num_train_epochs=settings.num_train_epochs,
            max_steps=settings.max_steps,
            per_device_train_batch_size=settings.per_device_train_batch_size,
            gradient_accumulation_steps=settings.gradient_accumulation_steps,
            max_length=settings.max_length,
            seed=settings.seed,
            bf16=bf16_enabled(settings.bf16),
            use_cpu=not torch.cuda.is_available(),
            **checkpointing,  # TRL turns it on by default; a small model only pays for it
            lr_scheduler_type="cosine",
            warmup_steps=10,
            save_strategy="steps",
            save_steps=settings.save_steps,
            logging_steps=5,
            report_to=[],
        )
        if job.main:
            own = dataclasses.asdict(settings)
            tracking.log_params(
                {
                    **own,
                    "data_digest": split.digest,
                    "sft": {k: v for k, v in config.to_dict().items() if k not in own},
                }
            )
            if job.resume_from is None:  # a resumed run has it: every metric step once
                mlflow.log_metric("data/train_examples", len(dataset))
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[tracking.MlflowMetrics(), StopOnNonFinite()],
        )
        trainer.train(resume_from_checkpoint=str(job.resume_from) if job.resume_from else None)
        tags = {
            "base_model": settings.model,
            "reasoning_vocab_size": "0",
            "data_digest": split.digest,
            "arm": "warmstart",
        }
        return job.finish(trainer, tokenizer, settings.registered_model_name, tags)
