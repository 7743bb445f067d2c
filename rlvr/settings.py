"""Helpers for the settings dataclasses behind the entry points: how a parameter is declared, and the checks
and values that more than one entry point derives from its settings (the schedule, activation
checkpointing, bf16, the Trainer arguments both trainers take)."""

from __future__ import annotations

import os
from dataclasses import field, fields
from typing import Any, Protocol

import torch

from rlvr.errors import InputError, flag, require_finite


def param(default: Any, help: str) -> Any:
    """A settings field with the help text its click option and MLproject parameter show."""
    return field(default=default, metadata={"help": help})


class TrainerSettings(Protocol):
    """The parameters the warm start and GRPO both take, as the code they share reads them.

    Each entry point declares them in its own settings dataclass, in its MLproject order, with its own
    defaults and help (a fine-tuning step and a GRPO step differ in most of them).
    """

    model: str
    data: str
    learning_rate: float
    num_train_epochs: float
    max_steps: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    seed: int
    bf16: str
    gradient_checkpointing: str
    save_steps: int
    output_dir: str
    registered_model_name: str


def check_schedule(settings: TrainerSettings) -> None:
    """The schedule both trainers take: a finite, non-negative learning rate and at least one step.

    Without this, `nan` fails deep inside the optimizer, `inf` epochs overflow, and `max_steps=0` (or -2)
    trains for no step and still registers a model.
    """
    require_finite(settings, "learning_rate", "num_train_epochs")
    if settings.learning_rate < 0:
        raise InputError(f"learning_rate={settings.learning_rate} is negative; pass a positive one.")
    if settings.max_steps != -1 and settings.max_steps < 1:
        raise InputError(
            f"max_steps={settings.max_steps} is neither a positive step count nor -1; pass e.g. "
            "max_steps=100, or -1 to train for num_train_epochs."
        )
    if settings.max_steps == -1 and settings.num_train_epochs <= 0:
        raise InputError(
            f"num_train_epochs={settings.num_train_epochs} with max_steps=-1 trains for no step; pass a "
            "positive num_train_epochs or a positive max_steps."
        )


def checkpointing_option(config_class: type, value: str) -> dict[str, bool]:
    """The `config_class(**...)` keyword for activation checkpointing, named as this transformers names it.

    transformers 5 renamed `gradient_checkpointing` to `activation_checkpointing`; TRL's configs default it
    on.
    """
    names = {f.name for f in fields(config_class)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: bool(flag("gradient_checkpointing", value))}


def bf16_enabled(value: str) -> bool:
    """Whether training runs under bf16 autocast. The `bf16` parameter decides, not the launcher: rlvr sets
    the sampling precision and the sampling correction from it, so a launcher asking for another precision
    (an accelerate config's `mixed_precision`) is refused rather than left to change the numerics unseen."""
    chosen = flag("bf16", value)
    enabled = (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) if chosen is None else chosen
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher not in ("no", "bf16" if enabled else "no"):
        raise InputError(
            f"the launcher asks for mixed_precision={launcher}, but training runs "
            f"{'with' if enabled else 'without'} bf16 (bf16={value}); launch with mixed_precision no (as "
            "configs/*.yaml do) and choose with -P bf16=..."
        )
    return enabled


def trainer_arguments(settings: TrainerSettings, config_class: type) -> dict[str, Any]:
    """The `config_class(**...)` keywords that both trainers' TRL configs take from their settings: where to
    save and how often, the schedule, the batch, the seed, the precision and the device."""
    return dict(
        output_dir=settings.output_dir,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        seed=settings.seed,
        bf16=bf16_enabled(settings.bf16),
        use_cpu=not torch.cuda.is_available(),
        save_strategy="steps",
        save_steps=settings.save_steps,
        **checkpointing_option(config_class, settings.gradient_checkpointing),
    )
