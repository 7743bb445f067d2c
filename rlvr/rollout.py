"""Fast constrained rollouts: a static KV cache and one compiled decode step that samples under the thought
mask.

Hugging Face `generate` spends most of a decode step in Python and small kernel launches, far from the time
it takes to read the weights. Here the whole step (forward through a preallocated cache, the thought mask,
temperature, sampling, the thought-state and end-of-sequence updates) is one function with fixed shapes, which
`torch.compile(mode="reduce-overhead")` turns into a replayed CUDA graph on GPUs; on a CPU it runs eagerly.

It samples from exactly the distribution the training head scores (masked logits at the sampling
temperature, Gumbel-max being an exact sampler), so every invariant of the constraint holds. Requests it does
not cover go to `generate`: which requests it serves is decided by an allowlist of generation fields
(`plain_request`), on the configuration resolved as `generate` resolves it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
from torch.distributed.tensor import DTensor
from transformers import AttentionInterface, GenerationConfig, PreTrainedModel, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rlvr import thoughts
from rlvr.cache import cache_dir
from rlvr.errors import InputError
from rlvr.fused_decode import decode_targets, fuse_projections

log = logging.getLogger(__name__)

PROMPT_BUCKET = 128  # prompt lengths are padded up to a multiple of this, so few cache shapes get compiled
KV_BUCKET = 64  # a decode step attends over the cache positions in use, rounded up to a multiple of this
_HANDLED_KWARGS = {"input_ids", "attention_mask", "generation_config"}
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
DECODE_ATTENTION = "rlvr_decode"  # the attention implementation rollouts run under, registered below


def _attend(query, key, value, mask, scale):
    """Attention of `groups` query rows per key/value head: (B, KVH, G, D) against (B, KVH, L, D).

    Two batched matmuls around an fp32 softmax, which the compiler fuses; on an H100 this beat SDPA's kernel
    for these shapes (BENCHMARKS.md).
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(scores.softmax(-1).to(value.dtype), value)


def decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA, except that a single new token's query heads are packed onto the key/value head they share.

    Under grouped-query attention SDPA with a mask needs the key/value heads repeated to the query heads,
    which copies the whole cache at every decode step (for a 0.6B model at batch 64 that is most of the step's
    memory traffic). One query token per head instead becomes `groups` query rows of its key/value head, so
    the cache is read once and never copied. Prefill and training shapes go to SDPA unchanged.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if (
        attention_mask is not None
    ):  # the rollout's mask covers the positions in use: read only those of the cache
        key, value = key[:, :, : attention_mask.shape[-1]], value[:, :, : attention_mask.shape[-1]]
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, heads // groups, groups, dim)
    output = _attend(packed, key, value, attention_mask, scaling)  # masks are (B, 1, 1, L): they broadcast
    return output.reshape(batch, 1, heads, dim), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


@dataclass
class _Compiled:
    cache: StaticCache
    step: object


# Generation fields that may hold any value: they change neither which tokens may be drawn nor their
# probabilities, and the fast path honours them (lengths, special ids, cache and compile settings).
HARMLESS_FIELDS = frozenset(
    {
        "max_length",
        "max_new_tokens",
        "do_sample",
        "temperature",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "decoder_start_token_id",
        "use_cache",
        "cache_implementation",
        "cache_config",
        "max_cache_len",
        "compile_config",
        "disable_compile",
        "transformers_version",
        "_from_model_config",
        "early_stopping",
        "length_penalty",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "assistant_confidence_threshold",
        "assistant_lookbehind",
        "target_lookbehind",
        "prefill_chunk_size",
    }
)
# Fields that change the sampled distribution unless they hold one of these values (None always does nothing).
SAMPLING_NEUTRAL = {
    "top_k": (0,),
    "top_p": (1.0,),
    "min_p": (0.0,),
    "top_h": (),
    "typical_p": (1.0,),
    "epsilon_cutoff": (0.0,),
    "eta_cutoff": (0.0,),
    "repetition_penalty": (1.0,),
    "encoder_repetition_penalty": (1.0,),
    "no_repeat_ngram_size": (0,),
    "encoder_no_repeat_ngram_size": (0,),
    "min_length": (0,),
    "min_new_tokens": (0,),
    "renormalize_logits": (False,),
    "remove_invalid_values": (False,),
    "guidance_scale": (1.0,),
    "num_beams": (1,),
    "num_beam_groups": (1,),
    "diversity_penalty": (0.0,),
    "bad_words_ids": (),
    "suppress_tokens": (),
    "begin_suppress_tokens": (),
    "sequence_bias": (),
    "forced_bos_token_id": (),
    "forced_eos_token_id": (),
    "exponential_decay_length_penalty": (),
    "watermarking_config": (),
    "penalty_alpha": (),
    "dola_layers": (),
    "constraints": (),
    "force_words_ids": (),
    "token_healing": (False,),
    "low_memory": (False,),
    "use_mtp": (False,),
}
# Fields that leave the distribution alone but ask for output or stopping rules the fast path does not give.
_OUTPUT_NEUTRAL = {
    "num_return_sequences": (1,),
    "output_attentions": (False,),
    "output_hidden_states": (False,),
    "output_scores": (False,),
    "output_logits": (False,),
    "return_dict_in_generate": (False,),
    "stop_strings": (),
    "max_time": (),
    "is_assistant": (False,),
    "prompt_lookup_num_tokens": (),
    "max_matching_ngram_size": (),
    "assistant_early_exit": (),
    "speculation_type": (),
    "assistant_ensemble_weight": (),
    "continuous_batching_config": (),
}


# Fields that act only when sampling (`generate`'s warpers): greedy decoding ignores them.
_WARPERS = frozenset({"top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff"})


def _unneutral(config: GenerationConfig, neutral: dict) -> list[str]:
    values = config.to_dict()
    ignored = frozenset() if config.do_sample else _WARPERS
    return [
        f"{name}={values[name]!r}"
        for name in sorted(neutral.keys() - ignored)
        if values.get(name) is not None and values[name] not in neutral[name]
    ]


def distribution_changes(config: GenerationConfig) -> list[str]:
    """`name=value` for each field of a resolved generation config that changes the sampled distribution away
    from the masked softmax at `temperature`, which is what the GRPO loss scores. An allowlist: a field that
    is neither harmless nor known with its neutral values counts as a change whenever it is set."""
    known = HARMLESS_FIELDS | SAMPLING_NEUTRAL.keys() | _OUTPUT_NEUTRAL.keys()
    unknown = [f"{k}={v!r}" for k, v in config.to_dict().items() if k not in known and v is not None]
    return _unneutral(config, SAMPLING_NEUTRAL) + sorted(unknown)


def plain_request(config: GenerationConfig, kwargs: dict) -> bool:
    """Whether a `generate` call (its config resolved as `generate` resolves it) asks for nothing but sampling
    (or greedy decoding) at a temperature, to a token budget: the requests the fast path serves exactly."""
    if set(kwargs) - _HANDLED_KWARGS or kwargs.get("input_ids") is None or config.max_new_tokens is None:
        return False
    return not distribution_changes(config) and not _unneutral(config, _OUTPUT_NEUTRAL)


class FastRollout:
    """Per-model state of the fast path: compiled decode steps keyed by (batch, cache length).

    With `dtype` set (bf16 for a model trained in fp32 under bf16 autocast) rollouts run on a copy of the
    weights in that dtype, refreshed before each rollout: the decode step then reads half the bytes and skips
    autocast's per-step weight casts, and the KV cache has one dtype.

    `own_copy` decodes on such a copy even in the model's own dtype. A sharded model needs it: under FSDP2
    each process holds a slice of every parameter (a DTensor), which the refresh gathers whole; under
    DeepSpeed ZeRO-3 the weights are whole only inside TRL's gather around `generate`. A copy also keeps the
    compiled decode step reading weights at fixed addresses, which sharding frees and reallocates. The copy
    is made on the device of the first rollout's inputs: a sharded model may still sit on the CPU when the
    trainer is built.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        compile: bool | None = None,
        dtype: torch.dtype | None = None,
        own_copy: bool = False,
    ):
        self.model = model
        self._model_class = type(model)  # before sharding, which may swap the class for a wrapper
        self.compile = compile  # None: compile when the first rollout decodes on a GPU
        self.dtype = dtype if dtype is not None and dtype != model.dtype else None
        self.copies = own_copy or self.dtype is not None
        self._shadow: PreTrainedModel | None = None
        self._compiled: dict[tuple[int, int], _Compiled] = {}
        self.calls = 0  # rollouts served, for tests and logs

    def prepare(self) -> None:
        """Check now that the model can be copied, so that a model it cannot copy is refused up front."""
        if self.copies:
            _require_same_parameters(self.model, self._empty_copy(torch.device("meta")))

    def _empty_copy(self, device: torch.device) -> PreTrainedModel:
        with torch.device("meta"):
            shadow = self._model_class(copy.deepcopy(self.model.config))
        if device.type != "meta":
            shadow = shadow.to_empty(device=device)
        for parameter in shadow.parameters():
            parameter.data = parameter.data.to(self.dtype or self.model.dtype)
        return shadow

    def _runner(self, device: torch.device) -> PreTrainedModel:
        """The module that decodes: the model, or its copy (on `device`) with current, whole weights."""
        if not self.copies:
            return self.model
        if self._shadow is None or self._shadow.device != device:
            shadow = self._empty_copy(device)
            shadow.tie_weights()
            for name, buffer in self.model.named_buffers():  # rotary frequencies stay in their own dtype
                shadow.get_buffer(name).copy_(buffer)
            _require_same_parameters(self.model, shadow)
            self._shadow = fuse_projections(shadow.eval().requires_grad_(False))
        shadow_parameters = decode_targets(self._shadow)
        with torch.no_grad():
            for name, parameter in self.model.named_parameters():
                target = shadow_parameters[name]
                whole = _whole(parameter)
                if whole.shape != target.shape:
                    raise RuntimeError(
                        f"fast rollouts got {tuple(whole.shape)} of parameter {name}, which holds "
                        f"{tuple(target.shape)}: its weights are sharded and were not gathered for the "
                        "rollout; run with fast_rollouts=false (ZeRO-3: ds3_gather_for_generation=true)."
                    )
                target.copy_(whole)
        return self._shadow

    def _entry(self, batch: int, length: int) -> _Compiled:
        key = (batch, length)
        if key not in self._compiled:
            # one spare position: the visible part of the cache is then always a strict slice, never the whole
            # (contiguous) tensor, so the compiled step's guards hold for every bucket
            cache = StaticCache(config=self.model.config, max_cache_len=length + 1)
            step = self._decode_step
            if self.compile:
                keep_compiled_kernels()
                # static shapes, except the length of the visible cache (marked dynamic): one compilation,
                # and one CUDA graph recorded per KV_BUCKET
                step = torch.compile(step, mode="reduce-overhead", dynamic=None, fullgraph=False)
            self._compiled[key] = _Compiled(cache, step)
            log.info("fast rollouts: new decode step for batch %d, cache length %d", batch, length)
        return self._compiled[key]

    def _decode_step(
        self,
        runner,
        cache,
        token,
        position,
        cache_position,
        attention,
        inside,
        finished,
        forbidden,
        eos,
        pad,
        inv_temperature,
        greedy: bool,
    ):
        logits = (
            runner(  # a 4D mask goes to the attention as it is: (batch, 1, 1, visible cache positions)
                input_ids=token,
                attention_mask=attention,
                position_ids=position,
                past_key_values=cache,
                cache_position=cache_position,
                use_cache=True,
            )
            .logits[:, -1]
            .float()
        )
        return _choose(
            logits, inside, finished, forbidden, eos, pad, inv_temperature, greedy, self.model.reasoning_vocab
        )

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: GenerationConfig
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_ids` followed by up to `max_new_tokens` sampled ids (padding after EOS), as `generate`
        returns, and each sampled token's log-prob (fp32) under the distribution it was drawn from."""
        if self.compile is None:
            self.compile = input_ids.device.type == "cuda"
        runner = self._runner(input_ids.device)
        with _attention(runner.config, DECODE_ATTENTION):
            return self._generate(runner, input_ids, attention_mask, config)

    def _generate(self, runner, input_ids, attention_mask, config):
        vocab = self.model.reasoning_vocab
        device = input_ids.device
        batch, prompt_length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        bucket = -(-prompt_length // PROMPT_BUCKET) * PROMPT_BUCKET
        shift = bucket - prompt_length  # extra left padding up to the bucket
        max_new = config.max_new_tokens
        length = bucket + max_new
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        eos = torch.tensor(_as_list(config.eos_token_id), device=device, dtype=torch.long)
        greedy = not config.do_sample
        inv_temperature = torch.tensor(1.0 if greedy else 1.0 / (config.temperature or 1.0), device=device)

        entry = self._entry(batch, length)
        entry.cache.reset()
        prompt = torch.nn.functional.pad(input_ids, (shift, 0), value=pad)
        attention = torch.zeros(batch, length, dtype=attention_mask.dtype, device=device)
        attention[:, shift:bucket] = attention_mask
        positions = (attention[:, :bucket].long().cumsum(-1) - 1).clamp(min=0)
        forbidden = vocab.forbidden_table(device)
        inside = thoughts.prompt_state(vocab, prompt)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)

        logits = (
            runner(
                input_ids=prompt,
                attention_mask=attention[:, :bucket],
                position_ids=positions,
                past_key_values=entry.cache,
                cache_position=torch.arange(bucket, device=device),
                use_cache=True,
                logits_to_keep=1,
            )
            .logits[:, -1]
            .float()
        )
        token, logprob, inside, finished = _choose(
            logits, inside, finished, forbidden, eos, pad, inv_temperature, greedy, vocab
        )
        if self.compile:
            _pin_cache(entry.cache)
        out = torch.full((batch, max_new), pad, dtype=torch.long, device=device)
        logprobs = torch.zeros(batch, max_new, dtype=torch.float32, device=device)
        out[:, 0], logprobs[:, 0] = token, logprob
        position = positions[:, -1:] + 1
        cache_position = torch.tensor([bucket], device=device)
        for t in range(1, max_new):
            attention[:, bucket + t - 1] = 1
            # a fresh contiguous mask: a view of `attention` would turn contiguous at the last bucket, a
            # new guard
            visible = attention[
                :, None, None, : min(length, -(-(bucket + t) // KV_BUCKET) * KV_BUCKET)
            ].bool()
            if self.compile:
                torch._dynamo.mark_dynamic(visible, 3)
                torch.compiler.cudagraph_mark_step_begin()
            state = entry.step(
                runner,
                entry.cache,
                token.unsqueeze(-1),
                position,
                cache_position,
                visible,
                inside,
                finished,
                forbidden,
                eos,
                pad,
                inv_temperature,
                greedy,
            )
            # a replay overwrites its outputs in place: keep copies, which the next step reads
            token, logprob, inside, finished = (x.clone() for x in state) if self.compile else state
            out[:, t], logprobs[:, t] = token, logprob
            position = position + 1
            cache_position = cache_position + 1
            if t % 32 == 0 and bool(finished.all()):
                out, logprobs = out[:, : t + 1], logprobs[:, : t + 1]
                break
        self.calls += 1
        return torch.cat([input_ids, out], 1), logprobs


@dataclass(frozen=True)
class RolloutWeights:
    """How fast rollouts can read the whole model under a distributed setup: `sharded` (decode on an own copy,
    refreshed from gathered weights), or `obstacle`, why they cannot (then TRL's generation samples)."""

    sharded: bool
    obstacle: str | None = None


def rollout_weights(accelerator, ds3_gather_for_generation: bool) -> RolloutWeights:
    """What the accelerator's sharding leaves fast rollouts to read (from its public state: distributed type,
    ZeRO stage, FSDP version); when they cannot read the whole model, the main process logs one warning.

    DDP and ZeRO-1/2 keep whole weights in every process. ZeRO-3 makes them whole only inside TRL's gather
    around `generate`, which `ds3_gather_for_generation` turns on. FSDP2 shards parameters as DTensors, which
    the copy gathers itself. FSDP1 flattens parameters into shards that TRL does not gather for generation.
    """
    kind = accelerator.distributed_type
    weights = RolloutWeights(sharded=False)
    if kind == DistributedType.DEEPSPEED and accelerator.deepspeed_plugin.zero_stage == 3:
        weights = RolloutWeights(
            sharded=True,
            obstacle=None
            if ds3_gather_for_generation
            else (
                "DeepSpeed ZeRO-3 with ds3_gather_for_generation=false leaves each process only its "
                "partition of the weights while it samples"
            ),
        )
    elif kind == DistributedType.FSDP:
        weights = RolloutWeights(
            sharded=True,
            obstacle=None
            if accelerator.is_fsdp2
            else (
                "FSDP1 keeps flattened shards that are not gathered for sampling (FSDP2: configs/fsdp2.yaml)"
            ),
        )
    if weights.obstacle and accelerator.is_main_process:
        log.warning(
            "fast rollouts are off: %s; TRL's generation samples instead (constrained, slower).",
            weights.obstacle,
        )
    return weights


def _whole(parameter: torch.Tensor) -> torch.Tensor:
    """A parameter as one tensor: an FSDP2 slice (a DTensor) gathered from every process, else itself."""
    return parameter.full_tensor() if isinstance(parameter, DTensor) else parameter


def _require_same_parameters(model: PreTrainedModel, shadow: PreTrainedModel) -> None:
    """The low-precision copy must hold every parameter of the model, in the same shapes, or it decodes
    another model (e.g. one whose `lm_head.bias` was added after construction, which `type(model)(config)`
    lacks)."""
    own = {name: p.shape for name, p in model.named_parameters()}
    copied = {name: p.shape for name, p in shadow.named_parameters()}
    if own != copied:
        missing = sorted(set(own) - set(copied)) + sorted(
            n for n in own.keys() & copied.keys() if own[n] != copied[n]
        )
        extra = sorted(set(copied) - set(own))
        raise InputError(
            f"fast rollouts cannot copy {type(model).__name__} to a low-precision twin built from its "
            f"config: parameters missing or reshaped {missing[:5]}, extra {extra[:5]}; run with "
            "fast_rollouts=false."
        )


@contextlib.contextmanager
def _attention(config, implementation: str):
    """Run the model under another registered attention implementation, restoring its own afterwards."""
    own = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = own


def keep_compiled_kernels() -> None:
    """Keep the compiler's on-disk caches (compiled graphs, Triton kernels, autotuning) in rlvr's cache
    directory rather than torch's per-machine `/tmp` default: a later run, on any node that shares the
    directory, then reuses the decode step instead of compiling it again (BENCHMARKS.md has the first-run and
    later-run costs). A `TORCHINDUCTOR_CACHE_DIR` the user set elsewhere is kept.

    The variable cannot be told apart from torch's default by whether it is set: importing transformers'
    masking utilities already makes torch write its default into the environment.
    """
    chosen = os.environ.get(INDUCTOR_CACHE_ENV)
    if chosen is None or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        os.environ[INDUCTOR_CACHE_ENV] = str(cache_dir() / "torchinductor")


def _pin_cache(cache: StaticCache) -> None:
    """Declare the cache tensors (allocated by the prefill) as fixed addresses, so the graph may update
    them."""
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                torch._dynamo.mark_static_address(tensor)


def _choose(logits, inside, finished, forbidden, eos, pad, inv_temperature, greedy: bool, vocab):
    """Next token under the thought mask; finished rows emit padding.

    Returns (token, its log-prob under the masked distribution, inside, finished).
    """
    logits = (logits * inv_temperature).masked_fill(forbidden[inside.long()], torch.finfo(logits.dtype).min)
    if greedy:
        token = logits.argmax(-1)
    else:  # Gumbel-max: argmax(logits - log E) with E ~ Exp(1) is a draw from softmax(logits)
        # E is floored at the smallest normal float: a draw of exactly 0 would make -log E infinite, and an
        # infinite bonus lifts even a masked id (at the dtype's most negative value) to the top
        noise = torch.empty_like(logits).exponential_().clamp_(min=torch.finfo(logits.dtype).tiny).log()
        token = (logits - noise).argmax(-1)
    logprob = logits.gather(-1, token.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    token = torch.where(finished, torch.full_like(token, pad), token)
    finished = finished | torch.isin(token, eos)
    return token, logprob, thoughts.advance(vocab, inside, token), finished


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)
