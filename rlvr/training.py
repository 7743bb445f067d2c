"""What GRPO and SFT jobs share: parameter declarations, checkpoints, the MLflow run, and the final model.

A job owns one `output_dir`: `checkpoint-0` (the starting model, token map included), the Trainer's
`checkpoint-N`, the id of its MLflow run, and `final/` once done. Only rank 0 talks to MLflow.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import field, fields
from pathlib import Path
from typing import Any

import mlflow
from accelerate import PartialState
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlvr import tracking
from rlvr.errors import InputError
from rlvr.guards import require_finite_weights
from rlvr.models import load_model, save_model
from rlvr.vocab import TOKEN_MAP_FILE

FINAL_DIR = "final"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def param(default: Any, help: str) -> Any:
    """A settings field with the help text its click option and MLproject parameter show."""
    return field(default=default, metadata={"help": help})


def flag(name: str, value: str) -> bool | None:
    """A true/false/auto parameter (MLproject has no boolean type); None means auto."""
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    if lowered == "auto":
        return None
    raise InputError(f"{name}={value!r} is not a switch; use true, false or auto.")


def checkpointing_option(config_class: type, value: str) -> dict[str, bool]:
    """The `config_class(**...)` keyword for activation checkpointing, named as this transformers names it.

    transformers 5 renamed `gradient_checkpointing` to `activation_checkpointing`; TRL's configs default it on.
    """
    names = {f.name for f in fields(config_class)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: bool(flag("gradient_checkpointing", value))}


def bf16_enabled(value: str) -> bool:
    import torch

    chosen = flag("bf16", value)
    return (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) if chosen is None else chosen


class Job:
    """One training invocation in `output_dir`, resumable from its newest checkpoint."""

    def __init__(self, output_dir: str, run_name: str, tags: Mapping[str, str]):
        self.output_dir = Path(output_dir)
        self.run_name = run_name
        self.tags = dict(tags)
        self.state = PartialState()
        self.main = self.state.is_main_process
        if (self.output_dir / FINAL_DIR / TOKEN_MAP_FILE).exists():
            raise InputError(
                f"output_dir {self.output_dir} already holds a finished training ({FINAL_DIR}/); choose a new "
                "output_dir, or delete it to train again."
            )
        self.resume_from = self._resumable_checkpoint()
        if self.main:
            tracking.check_tracking_server()

    @property
    def start_dir(self) -> Path:
        return self.output_dir / "checkpoint-0"

    def _resumable_checkpoint(self) -> Path | None:
        found = sorted(
            (int(m.group(1)), p) for p in self.output_dir.glob("checkpoint-*") if (m := _CHECKPOINT.match(p.name))
        )
        for step, path in reversed(found):
            if step > 0 and (path / "trainer_state.json").exists() and (path / TOKEN_MAP_FILE).exists():
                return path
        return None

    @contextmanager
    def run(self) -> Iterator[None]:
        """The MLflow run on rank 0 (the resumed one when resuming); nothing on other ranks."""
        if not self.main:
            yield
            return
        with tracking.resumable_run(self.output_dir, self.resume_from is not None, self.run_name, self.tags):
            yield

    def starting_model(
        self, load: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]]
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """`load()`'s model saved as `checkpoint-0`, or that checkpoint when resuming.

        The model then names `checkpoint-0` as its origin, so a reference model TRL builds from the
        name is the same expanded model.
        """
        if self.resume_from is not None:
            model, tokenizer = load_model(str(self.start_dir))
        else:
            model, tokenizer = load()
            if self.main:
                shutil.rmtree(self.start_dir, ignore_errors=True)
                save_model(model, tokenizer, self.start_dir)
            self.state.wait_for_everyone()
        model.config._name_or_path = str(self.start_dir)
        return model, tokenizer

    def finish(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, registered_model_name: str,
        tags: Mapping[str, str],
    ) -> str | None:
        """Save `final/`, tag the run, log the pyfunc model and register it. Returns the model URI on rank 0."""
        if not self.main:
            return None
        require_finite_weights(model, f"the trained model in {self.output_dir}")  # never saved, logged or registered
        final = save_model(model, tokenizer, self.output_dir / FINAL_DIR)
        try:
            mlflow.set_tags({f"rlvr.{k}": v for k, v in tags.items()})
            return tracking.log_model(final, registered_model_name or None, tags)
        except BaseException:
            shutil.rmtree(final)  # unfinished until logged: a rerun resumes from the last checkpoint, retries
            raise
