"""Every patch rlvr makes to a Hugging Face model and tokenizer, in one place.

A model obeys its reasoning vocabulary through instance attributes set here, never through edits of library
classes, so a plain model of the same class is untouched.

Attributes set on a model (`attach`, `enable_fast_rollouts`):
- `reasoning_vocab`: the `ReasoningVocab` (token map and masks).
- `config.rlvr_reasoning_vocab_size`, `config.rlvr_base_vocab_size`: N and E, which `save_pretrained` writes
  into config.json, so that a directory without its map is still known to be expanded.
- `reasoning_temperature`: the temperature the log-prob head scores at; the GRPO trainer reads it from the
  request its rollouts sample with, so the two cannot differ.
- `reasoning_head_fp32`: whether the log-prob head runs its projection in fp32 outside autocast.
- `record_sampling_logprobs`: when true, `generate` keeps the log-prob of each sampled token under the
  distribution it was drawn from, in `sampling_logprobs` (B, new tokens), for the importance-sampling
  correction.
- `_get_logits_processor`: `generate`'s processor list, with `ThoughtConstraint` first and, when recording,
  `SampledLogprobs` last (after temperature, so it sees the distribution actually sampled).
- `forward`: `rlvr.logprobs.constrained_forward` behind the class's own signature (which `generate` inspects).
- `generate`: routes plain sampling requests to `fast_rollout` when one is enabled, records log-probs.
- `save_pretrained`: also writes `reasoning_token_map.json`, so every checkpoint carries the map.
- `fast_rollout`: the `rlvr.rollout.FastRollout` serving plain sampling requests.
- on a module whose class carries the kernel-routing wrapper of Hugging Face's `kernels` package
  (`use_kernelized_func`, as transformers >= 5.25 puts on its attention classes), `forward`: the class's own
  forward under the wrapper (`rlvr.fused_decode.bypass_kernel_routing`), on every module rlvr compiles (the
  decoding copy, or the model it decodes on; compiled decoder layers). Under `torch.compile` the wrapper's
  context variable is left in its global mode after the first call, so the second call recompiles the whole
  graph; rlvr never swaps in hub kernels, which is all the routing is for.
On a tokenizer (`make_faithful`): its class becomes a subclass with `rlvr.decoding.FaithfulDecodeMixin`, and
`reasoning_vocab` is set.
On a model whose tokenizer lacks the thought tags (`rlvr.thought_tags.add_thought_tags`, at load): the tags
become added tokens, the embeddings grow where padding rows do not suffice, the new rows are set, and an
`enable_thinking=False` clause is appended to the chat template. These edit the model's data (saved with it),
not its behaviour.

On the low-precision copy fast rollouts decode on (never the model itself; `rlvr.fused_decode`): each known
attention and MLP module is wrapped in `FusedInputs`, and its q/k/v or gate/up projections become slices of
one product.

Private names of the libraries relied on (pinned by `pyproject.toml`; tests exercise each):
- kernels (a transformers dependency): that `use_kernelized_func` marks an instance with `_kernel_funcs` and
  wraps its class's forward with `functools.wraps` (so `__wrapped__` is the forward beneath).
- transformers: `GenerationMixin._get_logits_processor` (the seam for the constraint),
  `GenerationMixin._prepare_generation_config` (how `generate` fills unset fields, so the fast path resolves a
  request exactly as `generate` would), `PreTrainedTokenizerBase._decode` (faithful decoding),
  `PretrainedConfig._attn_implementation` (rollouts decode under `rlvr.rollout.DECODE_ATTENTION`).
- TRL: `trl.trainer.utils.FusedCausalLMOutput` (the fused log-prob contract, `fused_lm_head=True`) and
  `maybe_gather_lm_head_ctx` (the head's parameters gathered under ZeRO-3); in `GRPOTrainer` (see
  `rlvr.grpo`): `_generate_single_turn`, `_generate` (its first result, the prompt ids), `_calculate_rewards`,
  `_generate_and_score_completions`, `_metrics`, and the `use_vllm` flag that gates its sampling-mismatch
  correction (`vllm_importance_sampling_*`); under DeepSpeed ZeRO-3, that its transformers generation path
  calls `generate` inside a gather of the whole model (`ds3_gather_for_generation`), which fast rollouts copy.
"""

from __future__ import annotations

import functools
import types

import torch
from transformers import GenerationConfig, LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase

from rlvr import thoughts
from rlvr.decoding import faithful_class
from rlvr.sampling import plain_request
from rlvr.vocab import CONFIG_BASE, CONFIG_SIZE, TOKEN_MAP_FILE, ReasoningVocab, ReasoningVocabError


class ThoughtConstraint(LogitsProcessor):
    """Masks each generation step's scores by the thought state, which it carries from step to step.

    One instance serves one `generate` call. The first call reads the prompt (the state starts at the
    assistant turn); each later call reads only the newest token. Beam search reorders sequences between
    steps, so with beams every step rescans the completion.
    """

    def __init__(self, vocab: ReasoningVocab, rescan_every_step: bool = False):
        self.vocab = vocab
        self.rescan_every_step = rescan_every_step
        self._inside: torch.Tensor | None = None
        self._prompt_length = -1
        self._length = -1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        length = input_ids.shape[-1]
        if self._inside is None:
            self._prompt_length = length
            self._inside = thoughts.prompt_state(self.vocab, input_ids)
        elif (
            self.rescan_every_step
            or length != self._length + 1
            or self._inside.shape[0] != input_ids.shape[0]
        ):
            self._inside = thoughts.inside_after(self.vocab, input_ids, self._prompt_length)[:, -1]
        else:
            self._inside = thoughts.advance(self.vocab, self._inside, input_ids[:, -1])
        self._length = length
        return self.vocab.mask_logits(scores, self._inside)


class SampledLogprobs(LogitsProcessor):
    """Keeps, per step, the log-prob of the token that step sampled, under the final processed scores.

    A step's token is known only at the next call (or from the output), so the previous step's log-softmax is
    held until then: one (B, V) buffer, whatever the length. It is normalised in float64, as precisely as the
    loss's log-probs: an fp32 sum over ~300k ids on a CPU drops many tiny terms (off by up to ~3e-4), which
    would show up as a bias of the importance ratio.
    """

    def __init__(self):
        self._pending: torch.Tensor | None = None
        self._values: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._pending is not None:
            self._values.append(self._pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self._pending = torch.log_softmax(scores.double(), -1).float()
        return scores

    def result(self, sequences: torch.Tensor) -> torch.Tensor | None:
        """(B, new tokens) log-probs, given `generate`'s output."""
        if self._pending is None:
            return None
        values = [*self._values, self._pending.gather(-1, sequences[:, -1:]).squeeze(-1)]
        return torch.stack(values, 1)


def _constrained_logits_processor(self, generation_config, *args, **kwargs):
    """`generate`'s processor list with the thought constraint first, ahead of temperature and top-k/p."""
    processors = type(self)._get_logits_processor(self, generation_config, *args, **kwargs)
    beams = (getattr(generation_config, "num_beams", 1) or 1) > 1
    processors.insert(0, ThoughtConstraint(self.reasoning_vocab, rescan_every_step=beams))
    recorder = getattr(self, "_sampling_recorder", None)
    if recorder is not None:
        processors.append(recorder)
    return processors


def _save_with_token_map(self, save_directory, *args, **kwargs):
    """`save_pretrained` that also writes the token map, so every checkpoint carries it."""
    result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        self.reasoning_vocab.save(save_directory)
    return result


def resolve_generation_config(model: PreTrainedModel, config: GenerationConfig | None) -> GenerationConfig:
    """The configuration `generate` would run `config` with: unset fields from the model's, then global
    defaults."""
    return model._prepare_generation_config(config)[0]


def _generate(self, *args, **kwargs):
    """`generate` that serves plain sampling requests from the fast path and records sampling log-probs."""
    self.sampling_logprobs = None
    fast = getattr(self, "fast_rollout", None)
    if fast is not None and not args:
        config = resolve_generation_config(self, kwargs.get("generation_config"))
        if plain_request(config, kwargs):
            sequences, self.sampling_logprobs = fast.generate(
                kwargs["input_ids"], kwargs.get("attention_mask"), config
            )
            return sequences
    if not getattr(self, "record_sampling_logprobs", False):
        return type(self).generate(self, *args, **kwargs)
    self._sampling_recorder = SampledLogprobs()
    try:
        output = type(self).generate(self, *args, **kwargs)
        self.sampling_logprobs = self._sampling_recorder.result(getattr(output, "sequences", output))
    finally:
        self._sampling_recorder = None
    return output


def expand_model(model: PreTrainedModel, vocab: ReasoningVocab) -> PreTrainedModel:
    """Append `vocab.size` rows to the input and output embeddings, row `E + i` a copy of row `s_i`."""
    attached = getattr(model, "reasoning_vocab", None)
    present = attached.size if attached is not None else getattr(model.config, CONFIG_SIZE, 0)
    if present:
        raise ReasoningVocabError(
            f"the model already has a reasoning vocabulary of {present} rows; expanding it again would make "
            "copies of copies: load it with rlvr.load_model (which keeps its map), or expand its base model."
        )
    rows = model.get_input_embeddings().weight.shape[0]
    if rows != vocab.base_vocab_size:
        raise ReasoningVocabError(
            f"the model has {rows} embedding rows but the token map expects {vocab.base_vocab_size}; "
            "expand the unexpanded base model, or load the expanded directory with rlvr.load_model."
        )
    if vocab.size:
        model.resize_token_embeddings(vocab.total_size, mean_resizing=False)
        twins = torch.tensor(vocab.standard_token_ids, device=model.get_input_embeddings().weight.device)
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight
            embeddings[vocab.base_vocab_size :] = embeddings[twins]
            output = model.get_output_embeddings()
            if output is not None and output.weight.data_ptr() != embeddings.data_ptr():
                output.weight[vocab.base_vocab_size :] = output.weight[twins]
                if getattr(output, "bias", None) is not None:
                    output.bias[vocab.base_vocab_size :] = output.bias[twins]
    return attach(model, vocab)


def attach(
    model: PreTrainedModel, vocab: ReasoningVocab, temperature: float = 1.0, head_fp32: bool = False
) -> PreTrainedModel:
    """Make `model` obey `vocab` (in place): in every `generate`, in the training log-prob head, and on save.

    Idempotent; call again after anything that replaces `model.forward` (TRL's trainers do) to put the
    constrained head back, with the sampling temperature and the head precision of the trainer.
    """
    from rlvr.logprobs import check_plain_head, constrained_forward

    for side, matrix in (("input", model.get_input_embeddings()), ("output", model.get_output_embeddings())):
        rows = matrix.weight.shape[0]
        if rows != vocab.total_size:
            raise ReasoningVocabError(
                f"the model has {rows} {side} embedding rows but the token map's base_vocab_size + "
                f"standard_token_ids describe {vocab.total_size} ({vocab.base_vocab_size} + {vocab.size}); "
                f"the model and its {TOKEN_MAP_FILE} do not belong together: copy the map again from the "
                "checkpoint or run the model came from."
            )
    check_plain_head(model)
    model.reasoning_vocab = vocab
    setattr(model.config, CONFIG_SIZE, vocab.size)  # saved into config.json: the directory is expanded
    setattr(model.config, CONFIG_BASE, vocab.base_vocab_size)
    model.reasoning_temperature = float(temperature)
    model.reasoning_head_fp32 = bool(head_fp32)
    model._get_logits_processor = types.MethodType(_constrained_logits_processor, model)
    model.save_pretrained = types.MethodType(_save_with_token_map, model)
    model.forward = types.MethodType(_with_signature_of(type(model).forward, constrained_forward), model)
    model.generate = types.MethodType(_generate, model)
    return model


def enable_fast_rollouts(
    model: PreTrainedModel,
    compile: bool | None = None,
    dtype: torch.dtype | None = None,
    own_copy: bool = False,
) -> PreTrainedModel:
    """Route `model.generate`'s plain sampling requests through a `FastRollout` (in place); `own_copy` for a
    model whose weights will be sharded (see `FastRollout`)."""
    from rlvr.rollout import FastRollout

    if not hasattr(model, "reasoning_vocab"):
        raise ValueError("attach a reasoning vocabulary (rlvr.surgery.attach) before enabling fast rollouts")
    model.fast_rollout = FastRollout(model, compile=compile, dtype=dtype, own_copy=own_copy)
    model.fast_rollout.prepare()
    return model


def make_faithful(tokenizer: PreTrainedTokenizerBase, vocab: ReasoningVocab) -> PreTrainedTokenizerBase:
    """Give `tokenizer` (in place) faithful decoding for `vocab`; returns it for chaining.

    The new class keeps the original class's name, so `save_pretrained` writes a config that plain
    `AutoTokenizer` loads, and pickles by reference to its base (see `FaithfulDecodeMixin.__reduce__`).
    """
    tokenizer.__class__ = faithful_class(type(tokenizer))
    tokenizer.reasoning_vocab = vocab
    return tokenizer


def _with_signature_of(original, replacement):
    """`replacement` advertising `original`'s signature: `generate` validates its kwargs against it."""

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        return replacement(self, *args, **kwargs)

    return forward
