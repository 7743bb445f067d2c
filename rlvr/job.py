"""A training job, as GRPO and SFT run it: its output directory and checkpoints, the MLflow run, and the final
model.

A job owns one `output_dir`, whose layout `OutputDir` alone knows (analysis reads a training's directory
through it too): `checkpoint-0` (the starting model, token map included), the Trainer's `checkpoint-N`, the
id of its MLflow run, what it could not log during an outage of the tracking server, and `final/` once done.
Only rank 0 talks to MLflow. `run_job` is the job's course, the same for both trainers: data, starting model,
the trainer's own setup, the run, training (resumed where a killed job stopped), the final model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from rlvr.dataset import load_split
from rlvr.errors import InputError
from rlvr.guards import StopOnNonFinite, TrainingDiverged, avoid_cudnn_attention_backward
from rlvr.models import load_model, save_model
from rlvr.serving import log_model
from rlvr.settings import TrainerSettings
from rlvr.tracking import runs, server
from rlvr.tracking.metrics import MlflowMetrics
from rlvr.tracking.params import log_params
from rlvr.vocab import TOKEN_MAP_FILE

_WATCHER = "rlvr-launcher-watch"


@dataclass(frozen=True)
class OutputDir:
    """The layout of a training's `output_dir`, the one place that spells it.

    `checkpoint-<step>` is a checkpoint as the Trainer names it, `checkpoint-0` being the starting model;
    `final/` the finished model; `mlflow_run.json` the id of the job's MLflow run, which a resumed job
    reopens; `mlflow_unlogged.json` what the job could not log while the tracking server was down.
    """

    root: Path

    FINAL = "final"
    RUN_RECORD = "mlflow_run.json"
    UNLOGGED = "mlflow_unlogged.json"

    def checkpoint(self, step: int) -> Path:
        return self.root / f"{PREFIX_CHECKPOINT_DIR}-{step}"

    @property
    def start(self) -> Path:
        """`checkpoint-0`: the starting model, saved before the first step."""
        return self.checkpoint(0)

    @property
    def final(self) -> Path:
        return self.root / self.FINAL

    @property
    def finished(self) -> bool:
        """Whether `final/` holds a trained model: a job removes it when the model could not be logged."""
        return (self.final / TOKEN_MAP_FILE).exists()

    @property
    def run_record(self) -> Path:
        return self.root / self.RUN_RECORD

    @property
    def unlogged(self) -> Path:
        return self.root / self.UNLOGGED

    def recorded_run_id(self) -> str:
        """The run id in `mlflow_run.json`; raises OSError, ValueError, KeyError or TypeError for a file that
        is missing or holds no run record."""
        return json.loads(self.run_record.read_text())["run_id"]

    def record_run(self, run_id: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.run_record.write_text(json.dumps({"run_id": run_id}))

    def checkpoints(self, *needed: str) -> list[tuple[int, Path]]:
        """`(step, directory)` of every complete checkpoint, by step.

        Complete means its token map and each file in `needed` are written: what a reader needs decides, so a
        resume asks for the Trainer's state (which `checkpoint-0` has none of) and analysis for the model
        config.
        """
        pattern = re.compile(rf"^{re.escape(PREFIX_CHECKPOINT_DIR)}-(\d+)$")
        found = []
        for path in self.root.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
            match = pattern.match(path.name)
            if match and all((path / name).exists() for name in (TOKEN_MAP_FILE, *needed)):
                found.append((int(match.group(1)), path))
        return sorted(found)


def process_state() -> PartialState:
    """This process's place among the job's processes, set up as the Trainer will set it up.

    On a machine without a GPU, the processes a launcher started (`accelerate launch --multi_gpu`, torchrun,
    the SLURM `accelerate` template) are CPU processes joined over gloo, and accelerate recognises them only
    when told that the job runs on the CPU; otherwise each process would count itself as the only one, and
    every one of them would open its own MLflow run.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def end_with_launcher(poll_s: float = 0.5) -> None:
    """Under torchrun (`accelerate launch` with several processes, the SLURM `accelerate` template) end this
    process when its launcher is gone.

    torchrun starts every process in a session of its own, so killing the launcher's process group (`kill -9`,
    a closed terminal) would leave them training on, and a rerun would then share `output_dir` with them. A
    killed launcher thus ends its processes as it would end one process: abruptly, leaving the newest
    checkpoint to resume from.
    """
    if not torch.distributed.is_torchelastic_launched():
        return
    if any(thread.name == _WATCHER for thread in threading.enumerate()):
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name=_WATCHER, daemon=True).start()


class Job:
    """One training invocation in `output_dir`, resumable from its newest checkpoint."""

    def __init__(self, output_dir: str, run_name: str, tags: Mapping[str, str]):
        self.output_dir = Path(output_dir)
        self.outputs = OutputDir(self.output_dir)
        self.run_name = run_name
        self.tags = dict(tags)
        self.state = process_state()
        end_with_launcher()
        self.main = self.state.is_main_process
        if self.outputs.finished:
            raise InputError(
                f"output_dir {self.output_dir} already holds a finished training ({OutputDir.FINAL}/); "
                "choose a new output_dir, or delete it to train again."
            )
        self.resume_from = self._resumable_checkpoint()
        if self.main:
            server.check_tracking_server()

    def _resumable_checkpoint(self) -> Path | None:
        resumable = [path for step, path in self.outputs.checkpoints("trainer_state.json") if step > 0]
        return resumable[-1] if resumable else None

    @contextmanager
    def run(self) -> Iterator[None]:
        """The MLflow run on rank 0 (the recorded one when resuming); nothing on other ranks."""
        if not self.main:
            yield
            return
        resumed = None
        if self.resume_from is not None and self.outputs.run_record.exists():
            resumed = self.outputs.recorded_run_id()
        with runs.resumable_run(resumed, self.run_name, self.tags) as run:
            if resumed is None:
                self.outputs.record_run(run.info.run_id)
            yield

    def starting_model(
        self, load: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]]
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """`load()`'s model, or `checkpoint-0` when resuming. Called before the run starts, so a model that
        cannot be loaded fails with nothing written; `save_start` writes `checkpoint-0` in the run."""
        if self.resume_from is not None:
            return load_model(str(self.outputs.start))
        return load()

    def save_start(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Save the starting model as `checkpoint-0` (kept as it is when resuming).

        The model then names `checkpoint-0` as its origin, so a reference model TRL builds from the
        name is the same expanded model.
        """
        if self.resume_from is None:
            if self.main:
                shutil.rmtree(self.outputs.start, ignore_errors=True)
                save_model(model, tokenizer, self.outputs.start)
            self.state.wait_for_everyone()
        model.config._name_or_path = str(self.outputs.start)

    def finish(
        self,
        trainer: Trainer,
        tokenizer: PreTrainedTokenizerBase,
        registered_model_name: str,
        tags: Mapping[str, str],
    ) -> str | None:
        """Save `final/`, tag the run, log the pyfunc model and register it. Returns the model URI on rank 0.

        Every process calls it: the trained weights are gathered whole first (under FSDP and DeepSpeed ZeRO-3
        each process holds a shard; ZeRO-3 needs `stage3_gather_16bit_weights_on_model_save`), then rank 0
        writes them.
        """
        weights = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if not self.main:
            return None
        model = trainer.accelerator.unwrap_model(trainer.model)
        bad = [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()][:3]
        if bad:  # never saved, logged or registered
            raise TrainingDiverged(
                f"the trained model in {self.output_dir} has non-finite weights ({', '.join(bad)}); use "
                "one of its earlier checkpoints instead."
            )
        final = self.outputs.final
        model.save_pretrained(final, state_dict=weights)
        tokenizer.save_pretrained(final)
        try:
            mlflow.set_tags({f"rlvr.{k}": v for k, v in tags.items()})
            return log_model(final, registered_model_name or None, tags)
        except BaseException:
            shutil.rmtree(final)  # unfinished until logged: a rerun resumes from the last checkpoint, retries
            raise


@dataclass
class TrainerSetup:
    """What one trainer brings to a job once the starting model is loaded."""

    config: TrainingArguments
    dataset: Dataset
    # called like a Trainer class, with model, args, train_dataset, processing_class and callbacks
    trainer: Callable[..., Trainer]
    params: dict[str, Any]  # logged beside the settings
    config_key: str  # the config's other fields are logged under this prefix
    data_metrics: dict[str, float]  # logged once, when the run starts fresh


def run_job(
    settings: TrainerSettings,
    *,
    step: str,
    arm: str,
    model_arm: str,
    reasoning_vocab_size: int,
    prepare: Callable[[pd.DataFrame, PreTrainedModel, PreTrainedTokenizerBase], TrainerSetup],
) -> str | None:
    """Train as `settings` say, in a run named `step` and tagged with `step` and `arm`, and log the final
    model, tagged with `model_arm`; returns its URI (None on ranks other than 0).

    `prepare` makes the trainer's own part from the training split's rows and the starting model. Everything
    that can refuse the request (the output_dir, the tracking server, the data, the model, `prepare`) comes
    before the run starts and before anything is written.
    """
    avoid_cudnn_attention_backward()
    job = Job(settings.output_dir, run_name=step, tags={"rlvr.step": step, "rlvr.arm": arm})
    split = load_split(settings.data, "train").require_rows(settings.data)
    model, tokenizer = job.starting_model(
        lambda: load_model(settings.model, reasoning_vocab_size, seed=settings.seed)
    )
    if model.reasoning_vocab.size != reasoning_vocab_size:
        raise InputError(
            f"output_dir {job.output_dir} holds a run with reasoning_vocab_size="
            f"{model.reasoning_vocab.size}, not {reasoning_vocab_size}; resume with the same size "
            "or choose another output_dir."
        )
    setup = prepare(split.frame, model, tokenizer)
    with job.run():
        if job.main:
            mlflow.log_input(split.mlflow_dataset(), context="train")
        job.save_start(model, tokenizer)
        if job.main:
            settings_params = dataclasses.asdict(settings)
            config_params = {k: v for k, v in setup.config.to_dict().items() if k not in settings_params}
            log_params(
                {
                    **settings_params,
                    **setup.params,
                    "data_digest": split.digest,
                    setup.config_key: config_params,
                }
            )
            if job.resume_from is None:  # a resumed run has them: every metric step once
                mlflow.log_metrics(setup.data_metrics)
        trainer = setup.trainer(
            model=model,
            args=setup.config,
            train_dataset=setup.dataset,
            processing_class=tokenizer,
            callbacks=[MlflowMetrics(job.outputs), StopOnNonFinite()],
        )
        trainer.train(resume_from_checkpoint=str(job.resume_from) if job.resume_from else None)
        tags = {
            "base_model": settings.model,
            "reasoning_vocab_size": str(reasoning_vocab_size),
            "data_digest": split.digest,
            "arm": model_arm,
        }
        return job.finish(trainer, tokenizer, settings.registered_model_name, tags)
