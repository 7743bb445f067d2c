"""GRPO with TRL's `GRPOTrainer`, sampling and scoring under the reasoning-vocabulary constraint.

`train(settings)` is the whole job behind `train_baseline` and `train_reasoning`: one code path, the baseline
being `reasoning_vocab_size = 0`. It validates everything it can before a model is loaded, keeps every
checkpoint (`checkpoint-0` is the expanded starting point) with its token map, resumes a killed job into the
same MLflow run, and logs and registers the final model as an MLflow pyfunc.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
import yaml
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import GenerationConfig
from trl import GRPOConfig, GRPOTrainer

from rlvr import rewards, thoughts
from rlvr.errors import InputError, flag, require_at_least_one, require_finite
from rlvr.fused_decode import bypass_kernel_routing
from rlvr.generation import describe
from rlvr.job import TrainerSetup, process_state, run_job
from rlvr.rendering import marked_text
from rlvr.rollout import keep_compiled_kernels, rollout_weights
from rlvr.sampling import SAMPLING_NEUTRAL, distribution_changes, training_changes
from rlvr.settings import check_schedule, param, trainer_arguments
from rlvr.surgery import attach, enable_fast_rollouts, resolve_generation_config
from rlvr.tracking.metrics import MlflowMetrics
from rlvr.vocab import ReasoningVocab

log = logging.getLogger(__name__)

# train_reasoning's default: one copy of every Qwen3 token id below <|object_ref_start|>.
REASONING_VOCAB_SIZE = 151646
NO_GRAD_TOKENS = 32768  # tokens per forward in log-prob passes without gradients (activations only)
# GRPOConfig fields that turn on a rollout path which cannot apply the constraint, and why it cannot.
UNCONSTRAINED_ROLLOUTS = {
    "use_vllm": "vLLM samples outside this process, where the thought mask cannot be applied",
    "use_transformers_continuous_batching": "paged generation (generate_batch) bypasses the thought mask",
    "use_liger_kernel": "Liger's fused loss computes log-probs without the thought mask",
}


@dataclass
class TrainSettings:
    """Every parameter of the training entry points, with its one default. The code both trainers share reads
    the ones `rlvr.settings.TrainerSettings` names."""

    model: str = param(
        "Qwen/Qwen3-0.6B", "hub id, local directory, preset (tiny-qwen3, micro, ...) or MLflow model URI"
    )
    data: str = param("outputs/data", "preprocess output: its output_dir or a runs:/<run_id>/<path> URI")
    reasoning_vocab_size: int = param(0, "N reasoning rows appended (0 = baseline)")
    learning_rate: float = param(1e-6, "peak learning rate")
    num_train_epochs: float = param(1.0, "passes over the training prompts (ignored when max_steps > 0)")
    max_steps: int = param(-1, "optimizer steps to run (-1: from num_train_epochs)")
    per_device_train_batch_size: int = param(8, "completions per device per micro-batch")
    gradient_accumulation_steps: int = param(8, "micro-batches per optimizer step")
    num_generations: int = param(8, "completions sampled per prompt (the GRPO group)")
    max_prompt_length: int = param(512, "prompts longer than this many tokens are left out")
    max_completion_length: int = param(1024, "tokens sampled per completion at most")
    temperature: float = param(1.0, "sampling temperature (also used to score log-probs)")
    beta: float = param(0.0, "KL coefficient against the starting policy (0: no reference model)")
    loss_type: str = param("dapo", "GRPO loss normalisation: grpo, dr_grpo, dapo, bnpo, ...")
    seed: int = param(42, "random seed")
    bf16: str = param("auto", "bf16 autocast: true, false or auto (on when a GPU supports it)")
    gradient_checkpointing: str = param("false", "recompute activations in backward: true or false")
    fast_rollouts: str = param(
        "auto",
        "sample with a static KV cache and a compiled decode step: true, false, or auto (on with a GPU)",
    )
    sampling_correction: str = param(
        "true",
        "correct the loss for the sampler/trainer log-prob mismatch of fast "
        "rollouts and bf16 by truncated importance sampling: true or false",
    )
    save_steps: int = param(50, "save a checkpoint every this many optimizer steps")
    output_dir: str = param("outputs/train", "checkpoints go here; rerunning with the same directory resumes")
    registered_model_name: str = param("rlvr", "register the final model under this name ('' to skip)")
    accuracy_weight: float = param(1.0, "weight of the math-verify accuracy reward")
    format_weight: float = param(0.0, "weight of the format reward (one closed thought, one boxed answer)")
    rewards: str = param(
        "",
        "rewards and weights by name, e.g. 'accuracy:1,format:0.5' (known: "
        f"{', '.join(rewards.REWARDS)}); empty: accuracy_weight and format_weight",
    )
    log_completions_steps: int = param(
        10, "log a table of sample completions every this many steps (0: never)"
    )
    grpo_config: str = param("", "YAML file of further GRPOConfig fields")
    grpo_args: str = param("", "further GRPOConfig fields as 'key=value key=value'")

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))


def extra_grpo_fields(settings: TrainSettings) -> dict[str, Any]:
    """The pass-through GRPOConfig fields from `grpo_config` (YAML) and `grpo_args` (key=value), validated."""
    extra: dict[str, Any] = {}
    if settings.grpo_config:
        path = Path(settings.grpo_config)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise InputError(
                f"grpo_config {path} is not a readable YAML file ({error}); pass the path of a YAML mapping "
                "of GRPOConfig fields."
            ) from error
        if not isinstance(loaded, dict):
            raise InputError(
                f"grpo_config {path} must hold a mapping of GRPOConfig fields, not {type(loaded).__name__}."
            )
        extra.update(loaded)
    for item in settings.grpo_args.replace(",", " ").split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(
                f"grpo_args entry {item!r} is not key=value; write e.g. grpo_args='num_iterations=2'."
            )
        try:
            extra[key] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise InputError(
                f"grpo_args entry {item!r} has a value YAML cannot read ({str(error).splitlines()[0]}); "
                "entries are split at spaces and commas, so put mappings and lists in a grpo_config YAML "
                "file."
            ) from error
    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    own = {f.name for f in TrainSettings.fields()}
    for key, value in extra.items():
        if key in own:
            raise InputError(
                f"{key} is a parameter of its own; pass it as -P {key}=... instead of in "
                "grpo_config/grpo_args."
            )
        if key not in known:
            raise InputError(f"{key} is not a GRPOConfig field; check its spelling against TRL's GRPOConfig.")
        if key in UNCONSTRAINED_ROLLOUTS and value:
            raise InputError(
                f"{key}=true is refused: {UNCONSTRAINED_ROLLOUTS[key]}, so the model would train "
                "unconstrained. Use the default transformers generation."
            )
    _refuse_sampling_options(extra)
    return extra


def _refuse_sampling_options(extra: dict[str, Any]) -> None:
    """Sampling options that reshape the distribution (top-p, top-k, penalties, ...) are refused: the loss
    scores the plain masked softmax at `temperature`, so it would score another distribution than the sampled
    one."""
    options = {k: v for k, v in extra.items() if k in SAMPLING_NEUTRAL}
    generation_kwargs = extra.get("generation_kwargs") or {}
    if not isinstance(generation_kwargs, dict):
        raise InputError(
            f"generation_kwargs must be a mapping of generation options, not {generation_kwargs!r}."
        )
    if "temperature" in generation_kwargs:
        raise InputError(
            "generation_kwargs may not set temperature: it is a parameter of its own (-P temperature=...), "
            "which the loss scores at too."
        )
    try:
        changes = distribution_changes(
            GenerationConfig(**{"do_sample": True, **generation_kwargs, **options})
        )
    except (TypeError, ValueError) as error:
        raise InputError(
            f"the sampling options {sorted({**generation_kwargs, **options})} are invalid: {error}"
        ) from error
    if changes:
        raise InputError(
            f"sampling option {changes[0]} is refused: GRPO's loss scores the masked softmax at "
            "`temperature`, so sampling from another distribution would train on the wrong log-probs; "
            "remove it."
        )


def _loss_types() -> tuple[str, ...]:
    """The loss types TRL accepts. It names them only in the help of `GRPOConfig.loss_type` and checks them
    mid-step, so a misspelling would fail after the run started; () if that help text changes."""
    help_text = {f.name: f for f in dataclasses.fields(GRPOConfig)}["loss_type"].metadata.get("help", "")
    listed = re.search(r"Supported values are ([^.]*)\.", help_text)
    return tuple(re.findall(r"'(\w+)'", listed.group(1))) if listed else ()


def validate(settings: TrainSettings, world_size: int) -> None:
    """Checks that need no model or data, so a bad request fails in seconds."""
    if settings.reasoning_vocab_size < 0:
        raise InputError(
            f"reasoning_vocab_size={settings.reasoning_vocab_size} is negative; use 0 for the baseline."
        )
    require_at_least_one(
        settings,
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "num_generations",
        "max_prompt_length",
        "max_completion_length",
        "save_steps",
    )
    check_schedule(settings)
    require_finite(settings, "temperature", "beta", "accuracy_weight", "format_weight")
    chosen_rewards(settings)
    known = _loss_types()
    if known and settings.loss_type not in known:
        raise InputError(
            f"loss_type={settings.loss_type!r} is not a GRPO loss TRL knows; use one of {', '.join(known)}."
        )
    if settings.log_completions_steps < 0:
        raise InputError(
            f"log_completions_steps={settings.log_completions_steps} is negative; pass 0 to log none."
        )
    if settings.num_generations < 2:
        raise InputError("num_generations must be at least 2: GRPO compares completions within a group.")
    batch = settings.per_device_train_batch_size * settings.gradient_accumulation_steps * world_size
    if batch % settings.num_generations:
        raise InputError(
            f"num_generations={settings.num_generations} does not divide the generation batch of {batch} "
            f"completions (per_device_train_batch_size {settings.per_device_train_batch_size} x "
            f"gradient_accumulation_steps {settings.gradient_accumulation_steps} x {world_size} processes); "
            "pick sizes so that it does."
        )
    if settings.temperature <= 0:
        raise InputError(f"temperature={settings.temperature} must be positive for GRPO sampling.")
    flag("bf16", settings.bf16)
    flag("gradient_checkpointing", settings.gradient_checkpointing)
    flag("fast_rollouts", settings.fast_rollouts)
    if flag("sampling_correction", settings.sampling_correction) is None:
        raise InputError("sampling_correction must be true or false, not auto.")


def chosen_rewards(settings: TrainSettings) -> list[tuple[str, float]]:
    """The rewards to train on by name, with their weights, in the order the trainer gets them: `rewards`, or
    else accuracy and format at `accuracy_weight` and `format_weight`."""
    if not settings.rewards.strip():
        return [("accuracy", settings.accuracy_weight), ("format", settings.format_weight)]
    defaults = TrainSettings()
    if (settings.accuracy_weight, settings.format_weight) != (
        defaults.accuracy_weight,
        defaults.format_weight,
    ):
        raise InputError(
            f"rewards={settings.rewards!r} and accuracy_weight/format_weight both set the reward weights; "
            "pass only rewards (e.g. "
            f"rewards=accuracy:{settings.accuracy_weight},format:{settings.format_weight})."
        )
    return rewards.parse_rewards(settings.rewards)


def grpo_config(settings: TrainSettings, extra: dict[str, Any]) -> GRPOConfig:
    # rlvr logs to MLflow itself (`rlvr.tracking.metrics`), so the Trainer's own MLflow callback stays off.
    report_to = [r for r in extra.pop("report_to", []) or [] if r != "mlflow"]
    kwargs = dict(
        **trainer_arguments(settings, GRPOConfig),
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        beta=settings.beta,
        loss_type=settings.loss_type,
        logging_steps=1,
        reward_weights=[weight for _, weight in chosen_rewards(settings)],
        report_to=report_to,
        save_only_model=False,
        vllm_importance_sampling_correction=flag("sampling_correction", settings.sampling_correction)
        is not False,
        vllm_importance_sampling_mode="token_truncate",
    )
    kwargs.update(extra)
    try:
        return GRPOConfig(**kwargs)
    except ValueError as error:
        raise InputError(f"the GRPO settings are inconsistent: {error}") from error


COMPILE_LAYERS_ENV = "RLVR_COMPILE_LAYERS"


def layers_compiled(gradient_checkpointing: bool, distributed: bool) -> bool:
    """Whether training compiles each decoder layer (`compile_decoder_layers`): `RLVR_COMPILE_LAYERS=1` or
    `0` decides; unset, on a GPU in the configuration measured: one process, without gradient checkpointing
    (`distributed`: several processes, or weights sharded by DeepSpeed or FSDP). Never off a GPU: inductor's
    CPU kernels for it were not measured."""
    chosen = os.environ.get(COMPILE_LAYERS_ENV, "")
    if chosen not in ("", "0", "1"):
        raise InputError(f"{COMPILE_LAYERS_ENV}={chosen!r}: use 1 (compile the decoder layers), 0, or unset")
    if not torch.cuda.is_available():
        return False
    return chosen == "1" if chosen else not (gradient_checkpointing or distributed)


def compile_decoder_layers(model) -> None:
    """Compile each decoder layer of `model` for the training forward and backward (regional compilation:
    the layers share one compiled graph, with dynamic sequence lengths), so its norms, rotary embedding,
    activations and residual adds run fused instead of as one small kernel each (on one H200 it took the
    reference step's training half from 1.29 to 0.70 s and its peak memory down 4 GiB, BENCHMARKS.md); a
    model without a `layers` list is left as it is."""
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        return
    keep_compiled_kernels()
    for layer in layers:
        bypass_kernel_routing(layer).compile(dynamic=True)


def fast_rollouts_enabled(value: str) -> bool:
    chosen = flag("fast_rollouts", value)
    return torch.cuda.is_available() if chosen is None else chosen


class ReasoningGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` whose policy and reference score log-probs under the thought mask, plus vocabulary
    metrics.

    TRL installs its own fused log-prob head on both models during `__init__`; attaching the vocabulary
    afterwards puts the constrained head back. The sampling temperature has one carrier, the request every
    rollout makes (TRL's generation config, resolved as `generate` resolves it): the heads read theirs from
    it. Sampling is constrained by the model's own `generate`, which TRL calls unchanged; with `fast_rollouts`
    that `generate` takes the static-cache compiled path of `rlvr.rollout` for TRL's plain sampling requests.

    Where sampling and scoring differ numerically (fast rollouts, bf16), the sampled tokens' log-probs are
    kept and TRL's importance-sampling correction, which it gates on `use_vllm`, corrects the loss: the flag
    is set for that alone, since generation here is rlvr's own (`_generate_single_turn` never reaches vLLM).
    """

    def __init__(self, *args, completions_every: int = 0, fast_rollouts: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.vocab: ReasoningVocab = self.model.reasoning_vocab
        request = self._sampling_request()
        head_fp32 = bool(self.args.cast_lm_head_to_fp32)
        distributed = self.accelerator.num_processes > 1 or self.is_deepspeed_enabled or self.is_fsdp_enabled
        compiled = layers_compiled(bool(self.args.gradient_checkpointing), bool(distributed))
        for model in (self.model, self.ref_model):
            if model is not None:
                attach(model, self.vocab, temperature=request.temperature, head_fp32=head_fp32)
                if compiled:
                    compile_decoder_layers(self.accelerator.unwrap_model(model))
        if fast_rollouts:
            weights = rollout_weights(self.accelerator, self.args.ds3_gather_for_generation)
            fast_rollouts = weights.obstacle is None
            if fast_rollouts:  # sample in the precision the forward passes use: bf16 under bf16 autocast
                enable_fast_rollouts(
                    self.model, dtype=torch.bfloat16 if self.args.bf16 else None, own_copy=weights.sharded
                )
        self.correct_sampling = bool(
            self.args.vllm_importance_sampling_correction and (fast_rollouts or self.args.bf16)
        )
        self.model.record_sampling_logprobs = self.correct_sampling
        self.use_vllm = self.correct_sampling
        self.completions_every = completions_every
        self._tabled_steps: set[int] = set()
        self._prompt_ids: list[list[int]] = []

    def _sampling_request(self) -> GenerationConfig:
        """The request every rollout makes, as `generate` resolves it (the model's generation_config fills
        unset fields), refused unless it is the masked softmax at the trainer's temperature, the only
        distribution the loss scores."""
        request = resolve_generation_config(self.model, self.generation_config)
        changes = training_changes(request, self.temperature)
        if changes:
            raise InputError(
                f"sampling would use {', '.join(changes)} (from the model's generation_config or the GRPO "
                "settings), but the loss scores the masked softmax at temperature; give them neutral values "
                "in a grpo_config file, e.g. 'generation_kwargs: {top_k: 0, top_p: 1.0}'."
            )
        return request

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, *args, **kwargs
    ):
        """Passes without gradients (old-policy and reference log-probs over the whole generation batch)
        take as many sequences at once as fit NO_GRAD_TOKENS, not the training micro-batch: they keep no
        activations for a backward pass, and at micro-batch 8 most of their time went to per-forward overhead
        (BENCHMARKS.md). A sequence's log-probs do not depend on the batch scoring them (up to rounding)."""
        if batch_size and not torch.is_grad_enabled():
            batch_size = max(batch_size, NO_GRAD_TOKENS // max(1, input_ids.shape[1]))
        return super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size, *args, **kwargs
        )

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        self.use_vllm = False  # TRL's transformers path, with the model's own (constrained) generate
        try:
            completion_ids, _ = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        finally:
            self.use_vllm = self.correct_sampling
        if not self.correct_sampling:
            return completion_ids, None
        recorded = self.accelerator.unwrap_model(self.model).sampling_logprobs.float().cpu()
        return completion_ids, [recorded[row, : len(ids)].tolist() for row, ids in enumerate(completion_ids)]

    def _generate(self, prompts):
        result = super()._generate(prompts)
        self._prompt_ids = result[0]
        return result

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards, told for each completion whether its prompt's chat template opened the thought."""
        starts = [bool(thoughts.prompt_state(self.vocab, torch.tensor([ids]))[0]) for ids in self._prompt_ids]
        inputs = [{**example, "starts_in_thought": s} for example, s in zip(inputs, starts, strict=True)]
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        starts = thoughts.prompt_state(self.vocab, output["prompt_ids"])
        before = thoughts.completion_states(self.vocab, starts, output["completion_ids"])
        self._require_allowed_samples(output, before)
        counts = thoughts.batch_counts(
            self.vocab, before, output["completion_ids"], output["completion_mask"], self.eos_token_ids
        )
        counted = thoughts.Counts(*self.accelerator.gather(counts.unsqueeze(0)).sum(0).tolist())
        self._metrics[mode]["reasoning/token_share"].append(counted.reasoning_share)
        self._metrics[mode]["reasoning/thought_length"].append(counted.thought_length)
        self._metrics[mode]["reasoning/answer_length"].append(counted.answer_length)
        self._metrics[mode]["reasoning/closed_thought_rate"].append(counted.closed_rate)
        if mode == "train":
            self._maybe_log_samples(inputs, output, starts.tolist())
        return output

    def _require_allowed_samples(self, output, before: torch.Tensor) -> None:
        """No sampled token may be one the mask forbids where it stands (`before`: the state before each
        token): the loss would score it at the masked value, and one such token sends a step's log-probs out
        of range."""
        forbidden = self.vocab.forbidden_table(before.device)[before.long(), output["completion_ids"]]
        forbidden &= output["completion_mask"].bool()
        if forbidden.any():
            row, column = (int(i) for i in forbidden.nonzero()[0])
            token = int(output["completion_ids"][row, column])
            raise RuntimeError(
                f"the sampler drew id {token}, which the thought mask forbids at completion position "
                f"{column} (inside a thought: {bool(before[row, column])}); this is a bug in the sampling "
                "path, not the data."
            )

    def _maybe_log_samples(self, inputs, output, starts: list[bool]) -> None:
        """Every `completions_every` steps, a table of the step's completions from every process (rank 0 logs
        it).

        Each row keeps the sampled ids as the loss saw them (EOS included), so the table can be re-read with
        `rlvr.thoughts` without decoding text.
        """
        step = self.state.global_step
        if not self.completions_every or step % self.completions_every or step in self._tabled_steps:
            return
        self._tabled_steps.add(step)
        rows = []
        for example, ids, mask, starts_inside in zip(
            inputs, output["completion_ids"], output["completion_mask"], starts, strict=True
        ):
            sampled = ids[mask.bool()].tolist()
            token_ids = thoughts.until_stop(sampled, self.eos_token_ids)
            sample = describe(token_ids, self.processing_class, self.vocab, starts_inside)
            rows.append(
                {
                    "step": step,
                    "rank": self.accelerator.process_index,
                    "prompt": example["prompt"][-1]["content"],
                    "completion": marked_text(sample.text, sample.spans),
                    "solution": example["solution"],
                    "correct": rewards.answer_is_correct(sample.answer, example["solution"]),
                    "reasoning_tokens": sample.reasoning_tokens,
                    "completion_ids": sampled,
                }
            )
        rows = gather_object(rows)  # every process takes part, so the table holds the whole batch
        callbacks = self.callback_handler.callbacks
        tracker = next((c for c in callbacks if isinstance(c, MlflowMetrics)), None)
        if self.accelerator.is_main_process and mlflow.active_run() is not None and tracker is not None:
            tracker.log_table(pd.DataFrame(rows), f"completions/step_{step:06d}.json", step=step + 1)


def _prompt_dataset(frame, tokenizer, max_prompt_length: int) -> tuple[Dataset, int]:
    """TRL's conversational prompt dataset, without prompts longer than `max_prompt_length` tokens."""
    texts = [
        tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False)
        for p in frame["prompt"]
    ]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    keep = [n <= max_prompt_length for n in lengths]
    kept = frame.loc[keep, ["prompt", "solution", "id"]].reset_index(drop=True)
    if kept.empty:
        raise InputError(
            f"every training prompt is longer than max_prompt_length={max_prompt_length} tokens (shortest: "
            f"{min(lengths)}); raise max_prompt_length."
        )
    records = [
        {"prompt": [dict(m) for m in row.prompt], "solution": row.solution, "id": row.id}
        for row in kept.itertuples()
    ]
    return Dataset.from_list(records), len(frame) - len(kept)


def train(settings: TrainSettings) -> str | None:
    """Run GRPO as `settings` say; returns the logged model's URI (None on ranks other than 0)."""
    world = process_state().num_processes
    validate(settings, world)
    extra = extra_grpo_fields(settings)
    arm = "reasoning" if settings.reasoning_vocab_size else "baseline"

    def prepare(frame: pd.DataFrame, model, tokenizer) -> TrainerSetup:
        dataset, too_long = _prompt_dataset(frame, tokenizer, settings.max_prompt_length)
        config = grpo_config(settings, extra)
        trainer = functools.partial(
            ReasoningGRPOTrainer,
            reward_funcs=rewards.reward_functions(
                tokenizer, names=[name for name, _ in chosen_rewards(settings)]
            ),
            completions_every=settings.log_completions_steps,
            fast_rollouts=fast_rollouts_enabled(settings.fast_rollouts),
        )
        return TrainerSetup(
            config=config,
            dataset=dataset,
            trainer=trainer,
            params={"arm": arm, "base_vocab_size": model.reasoning_vocab.base_vocab_size},
            config_key="grpo",
            data_metrics={"data/train_prompts": len(dataset), "data/prompts_too_long": too_long},
        )

    return run_job(
        settings,
        step=f"train_{arm}",
        arm=arm,
        model_arm=arm,
        reasoning_vocab_size=settings.reasoning_vocab_size,
        prepare=prepare,
    )
