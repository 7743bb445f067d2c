"""Fast constrained rollouts: a static KV cache and one compiled decode step that samples under the thought mask.

Hugging Face `generate` spends most of a decode step in Python and small kernel launches, far from the time
it takes to read the weights. Here the whole step (forward through a preallocated cache, the thought mask,
temperature, sampling, the thought-state and end-of-sequence updates) is one function with fixed shapes, which
`torch.compile(mode="reduce-overhead")` turns into a replayed CUDA graph on GPUs; on a CPU it runs eagerly.

It samples from exactly the distribution the training head scores (masked logits at the sampling
temperature, Gumbel-max being an exact sampler), so every invariant of the constraint holds. Requests it does
not cover (top-k/top-p/min-p, repetition penalties, beams, extra processors, scores) go to `generate`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import types
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, GenerationConfig, PreTrainedModel, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger(__name__)

PROMPT_BUCKET = 128  # prompt lengths are padded up to a multiple of this, so few cache shapes get compiled
_HANDLED_KWARGS = {"input_ids", "attention_mask", "generation_config"}
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

    Under grouped-query attention SDPA with a mask needs the key/value heads repeated to the query heads, which
    copies the whole cache at every decode step (for a 0.6B model at batch 64 that is most of the step's memory
    traffic). One query token per head instead becomes `groups` query rows of its key/value head, so the cache
    is read once and never copied. Prefill and training shapes go to SDPA unchanged.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
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


def _plain_request(config: GenerationConfig, kwargs: dict) -> bool:
    """Whether `generate` was asked for nothing but sampling (or greedy) at a temperature, to a token budget."""
    if set(kwargs) - _HANDLED_KWARGS or kwargs.get("input_ids") is None:
        return False
    return (
        (config.num_beams or 1) == 1
        and not config.top_k
        and (config.top_p is None or config.top_p >= 1.0)
        and not config.min_p
        and (config.repetition_penalty or 1.0) == 1.0
        and not config.output_scores
        and not config.output_logits
        and not config.return_dict_in_generate
        and config.max_new_tokens is not None
        and (config.min_new_tokens or 0) == 0
        and not getattr(config, "suppress_tokens", None)
        and not getattr(config, "bad_words_ids", None)
        and not getattr(config, "stop_strings", None)
        and (config.no_repeat_ngram_size or 0) == 0
    )


class FastRollout:
    """Per-model state of the fast path: compiled decode steps keyed by (batch, cache length).

    With `dtype` set (bf16 for a model trained in fp32 under bf16 autocast) rollouts run on a copy of the
    weights in that dtype, refreshed before each rollout: the decode step then reads half the bytes and skips
    autocast's per-step weight casts, and the KV cache has one dtype.
    """

    def __init__(self, model: PreTrainedModel, compile: bool | None = None, dtype: torch.dtype | None = None):
        self.model = model
        self.compile = model.device.type == "cuda" if compile is None else compile
        self.dtype = dtype if dtype is not None and dtype != model.dtype else None
        self._shadow: PreTrainedModel | None = None
        self._compiled: dict[tuple[int, int], _Compiled] = {}
        self.calls = 0  # rollouts served, for tests and logs

    def _runner(self) -> PreTrainedModel:
        """The module that decodes: the model itself, or its low-precision copy with current weights."""
        if self.dtype is None:
            return self.model
        if self._shadow is None:
            with torch.device("meta"):
                shadow = type(self.model)(copy.deepcopy(self.model.config))
            shadow = shadow.to_empty(device=self.model.device)
            for parameter in shadow.parameters():
                parameter.data = parameter.data.to(self.dtype)
            shadow.tie_weights()
            for name, buffer in self.model.named_buffers():  # rotary frequencies stay in their own dtype
                shadow.get_buffer(name).copy_(buffer)
            self._shadow = shadow.eval().requires_grad_(False)
        current = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, parameter in self._shadow.named_parameters():
                parameter.copy_(current[name])
        return self._shadow

    def _entry(self, batch: int, length: int) -> _Compiled:
        key = (batch, length)
        if key not in self._compiled:
            cache = StaticCache(config=self.model.config, max_cache_len=length)
            step = self._decode_step
            if self.compile:
                step = torch.compile(step, mode="reduce-overhead", dynamic=False, fullgraph=False)
            self._compiled[key] = _Compiled(cache, step)
            log.info("fast rollouts: new decode step for batch %d, cache length %d", batch, length)
        return self._compiled[key]

    def _decode_step(self, runner, cache, token, position, cache_position, attention, inside, finished, forbidden,
                     eos, pad, inv_temperature, greedy: bool):
        logits = runner(
            input_ids=token, attention_mask=attention, position_ids=position, past_key_values=cache,
            cache_position=cache_position, use_cache=True,
        ).logits[:, -1].float()
        return _choose(logits, inside, finished, forbidden, eos, pad, inv_temperature, greedy,
                       self.model.reasoning_vocab)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: GenerationConfig):
        """`input_ids` followed by up to `max_new_tokens` sampled ids (padding after EOS), as `generate` returns."""
        runner = self._runner()
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
        inside = vocab.thought_state(prompt)[:, -1]
        finished = torch.zeros(batch, dtype=torch.bool, device=device)

        logits = runner(
            input_ids=prompt, attention_mask=attention[:, :bucket], position_ids=positions,
            past_key_values=entry.cache, cache_position=torch.arange(bucket, device=device), use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1].float()
        token, inside, finished = _choose(logits, inside, finished, forbidden, eos, pad, inv_temperature, greedy, vocab)
        if self.compile:
            _pin_cache(entry.cache)
        out = torch.full((batch, max_new), pad, dtype=torch.long, device=device)
        out[:, 0] = token
        position = positions[:, -1:] + 1
        cache_position = torch.tensor([bucket], device=device)
        for t in range(1, max_new):
            attention[:, bucket + t - 1] = 1
            if self.compile:
                torch.compiler.cudagraph_mark_step_begin()
            state = entry.step(
                runner, entry.cache, token.unsqueeze(-1), position, cache_position, attention, inside, finished, forbidden,
                eos, pad, inv_temperature, greedy,
            )
            # a replay overwrites its outputs in place: keep copies, which the next step reads
            token, inside, finished = (x.clone() for x in state) if self.compile else state
            out[:, t] = token
            position = position + 1
            cache_position = cache_position + 1
            if t % 32 == 0 and bool(finished.all()):
                out = out[:, : t + 1]
                break
        self.calls += 1
        return torch.cat([input_ids, out], 1)


@contextlib.contextmanager
def _attention(config, implementation: str):
    """Run the model under another registered attention implementation, restoring its own afterwards."""
    own = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = own


def _pin_cache(cache: StaticCache) -> None:
    """Declare the cache tensors (allocated by the prefill) as fixed addresses, so the graph may update them."""
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                torch._dynamo.mark_static_address(tensor)


def _choose(logits, inside, finished, forbidden, eos, pad, inv_temperature, greedy: bool, vocab):
    """Next token under the thought mask; finished rows emit padding. Returns (token, inside, finished)."""
    logits = (logits * inv_temperature).masked_fill(forbidden[inside.long()], torch.finfo(logits.dtype).min)
    if greedy:
        token = logits.argmax(-1)
    else:  # Gumbel-max: argmax(logits - log E) with E ~ Exp(1) is a draw from softmax(logits)
        token = (logits - torch.empty_like(logits).exponential_().log()).argmax(-1)
    token = torch.where(finished, torch.full_like(token, pad), token)
    finished = finished | torch.isin(token, eos)
    return token, vocab.advance(inside, token), finished


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def _fast_generate(self, *args, **kwargs):
    """`generate` that serves plain sampling requests from the fast path and everything else as before."""
    config = kwargs.get("generation_config") or self.generation_config
    if args or not _plain_request(config, kwargs):
        return type(self).generate(self, *args, **kwargs)
    return self.fast_rollout.generate(kwargs["input_ids"], kwargs.get("attention_mask"), config)


def enable_fast_rollouts(
    model: PreTrainedModel, compile: bool | None = None, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """Route `model.generate`'s plain sampling requests through a `FastRollout` (in place)."""
    if not hasattr(model, "reasoning_vocab"):
        raise ValueError("attach a reasoning vocabulary (rlvr.vocab.attach) before enabling fast rollouts")
    model.fast_rollout = FastRollout(model, compile=compile, dtype=dtype)
    model.generate = types.MethodType(_fast_generate, model)
    return model
