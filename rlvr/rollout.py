"""Fast constrained decoding: a static KV cache and one compiled decode step that samples under the thought
mask, for training rollouts and for evaluation.

Hugging Face `generate` spends most of a decode step in Python and small kernel launches, far from the time
it takes to read the weights. Here the whole step (forward through a preallocated cache, the thought mask,
temperature, top-k/top-p, sampling, the thought-state and end-of-sequence updates) is one function with
fixed shapes, which `torch.compile(mode="reduce-overhead")` turns into a replayed CUDA graph on GPUs; on a CPU
it runs eagerly. The compiled step is one function for the whole process, so batches and models of the same
shape reuse it.

Every sequence occupies one row (a slot) of the batch and carries its own state: position, thought state,
tokens emitted, whether it is still running. A slot whose sequence ends is refilled from the queue
(`FastRollout.sample`), so finished sequences stop costing decode steps; the cache's columns are used as a
ring, the newest prompt written just behind the column that the next step writes. A training rollout
(`FastRollout.generate`) is one batch filled once.

Sampling is exact. Without truncation it draws from the masked softmax at the sampling temperature (what the
training head scores) by Gumbel-max. Top-k masks as Hugging Face's warper does. Top-p is sampled by
rejection: each step proposes a few independent draws from the (masked, tempered, top-k) distribution and
takes the first whose strictly more probable tokens hold less than `top_p` of the mass, i.e. the first inside
the nucleus that Hugging Face's warper keeps; this is a draw from the renormalised nucleus. If every proposal
falls outside it (rarely: the draws per step are chosen for that), the slot stalls for one step and draws
again, without advancing. In `sample` the noise of each draw is a counter-based hash of (seed, sequence,
tokens emitted, stalls, draw), so a sequence's samples do not depend on its batch, its slot, the number of
processes or the model it is drawn from: the same seed gives every model the same random numbers. A training
rollout draws from torch's generator, as `generate` does.

Which requests the training path serves is decided by `rlvr.sampling` (`plain_request`), on the configuration
resolved as `generate` resolves it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
from torch.distributed.tensor import DTensor
from transformers import AttentionInterface, GenerationConfig, PreTrainedModel, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rlvr import block_attention, thoughts
from rlvr.cache import cache_dir
from rlvr.errors import InputError
from rlvr.fused_decode import bypass_kernel_routing, decode_targets, fuse_projections, logit_rows, pad_head
from rlvr.sampling import Sampling

log = logging.getLogger(__name__)

PROMPT_BUCKET = 128  # compiled: prompts are padded up to a multiple of this, so few cache shapes get compiled
EAGER_GROUP = 64  # eager: prompts whose lengths differ by less than this share a batch
KV_BUCKET = 64  # a decode step attends over the cache positions in use, rounded up to a multiple of this
# Columns a cache holds beyond its ring: an eager step's visible part of the cache is then always a strict
# slice. A whole bucket, so that every row of the cache starts on an aligned address: with a row length not a
# multiple of 8 (e.g. 641 columns) the attention's batched products on the H200 ran on unaligned fallback
# kernels, most of a decode step's time in the profile (BENCHMARKS.md).
SPARE_COLUMNS = KV_BUCKET
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
DECODE_ATTENTION = "rlvr_decode"  # the attention implementation rollouts run under, registered below
PREFILL_TOKENS = 16384  # prompt tokens per prefill forward at most, which bounds its activations
MAX_AUTO_BATCH = 512  # beyond this a step's time grows about linearly with the batch (it reads the cache)
CPU_AUTO_BATCH = 128  # slots on a CPU: larger batches gained nothing on the demo (BENCHMARKS.md)
MEMORY_SHARE = 0.9  # of the free accelerator memory, the most an automatic batch takes
MEMORY_RESERVE = 2 << 30  # bytes left for the prefill's activations and the compiled graphs' buffers
SAMPLING_COPIES = 8  # fp32 (batch, vocabulary) buffers a sampling step holds at once, at most
STALL_RATE = 0.003  # top-p: proposals per step are enough that all miss the nucleus at most this often
MAX_PROPOSALS = 64
RECOMPILE_LIMIT = 64  # compiled decode-step graphs one process may hold (one per cache shape and rule)
CHECK_EVERY = 16  # decode steps between looks at which sequences ended (each look waits for the GPU)
REPORT_SHARE = 0.8  # of the device's time for those steps, the most the host spends on ended sequences
REFILL_SHARE = 8  # refill once 1/REFILL_SHARE of the slots are free (or the queue has no more than that)
_MASK32 = 0xFFFFFFFF
_MIXERS = (0x5BD1E995, 0x27D4EB2F, 0x165667B1)  # odd multipliers below 2^31: products stay below 2^63


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
    if isinstance(attention_mask, block_attention.BlockMask):  # a compiled step's mask, as blocks
        return block_attention.attend(query, key, value, attention_mask, scaling), None
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] == 1 and attention_mask is not None:
        # the rollout's mask covers the positions in use: read only those of the cache
        key, value = key[:, :, : attention_mask.shape[-1]], value[:, :, : attention_mask.shape[-1]]
    if query.shape[2] != 1 or groups == 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, heads // groups, groups, dim)
    output = _attend(packed, key, value, attention_mask, scaling)  # masks are (B, 1, 1, L): they broadcast
    return output.reshape(batch, 1, heads, dim), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


# --- the cache ----------------------------------------------------------------------------------------------
class SlotCache(StaticCache):
    """A static cache whose writes go where the decoder says, whatever the library version's own bookkeeping.

    A decode step writes column `column` of every row and returns the whole cache (the attention mask says
    which columns each row sees). A prefill (`prefill(rows, sources, columns)`) writes, for each row, the keys
    and values of prompt `sources[i]` of the forward into `columns`, and returns the prompt's own states.
    """

    def __init__(self, config, batch: int, length: int, dtype: torch.dtype, device: torch.device):
        super().__init__(config=config, max_cache_len=length)
        heads = config.num_key_value_heads or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch, heads, length, head_dim)
        self.slot_keys = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self.slot_values = [torch.zeros_like(k) for k in self.slot_keys]
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        for tensor in (*self.slot_keys, *self.slot_values, self.column):
            torch._dynamo.mark_static_address(tensor)  # the compiled step updates them in place
        self._target: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def bytes_per_row(config, length: int, dtype: torch.dtype) -> int:
        heads = config.num_key_value_heads or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * heads * head_dim * length * element

    @contextlib.contextmanager
    def prefill(self, rows: torch.Tensor, sources: torch.Tensor, columns: torch.Tensor):
        self._target = (rows, sources, columns)
        try:
            yield
        finally:
            self._target = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.slot_keys[layer_idx], self.slot_values[layer_idx]
        if self._target is None:
            keys.index_copy_(2, self.column, key_states)
            values.index_copy_(2, self.column, value_states)
            return keys, values
        rows, sources, columns = self._target
        where = (rows[:, None], slice(None), columns[None, :])  # indexes (rows, columns, heads, dim)
        keys[where] = key_states[sources].transpose(1, 2).to(keys.dtype)
        values[where] = value_states[sources].transpose(1, 2).to(values.dtype)
        return key_states, value_states


# --- the noise ----------------------------------------------------------------------------------------------
def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift and multiply rounds) of int64 values in [0, 2^32), elementwise."""
    for multiplier in _MIXERS:
        x = ((x ^ (x >> 15)) * multiplier) & _MASK32
    return x ^ (x >> 16)


def sequence_keys(seed: int, uids: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """(B,) int64: the noise key of sample `samples[i]` of prompt `uids[i]` under `seed`."""
    base = _mix(torch.full_like(uids, seed & _MASK32) ^ (seed >> 32 & _MASK32))
    keyed = _mix(_mix(base ^ (uids & _MASK32)) ^ (uids >> 32 & _MASK32))
    return _mix(keyed ^ (samples & _MASK32))


def _gumbel(keys: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) fp32 Gumbel noise, one row per key: -log E with E ~ Exp(1) from a 32-bit uniform.

    The uniform's resolution is finest near 0, where E is small and the bonus large: the extreme tail that
    decides rare draws keeps its shape down to 2^-33, and E is capped at 2^-24's tail above (a draw that
    loses anyway), so no noise is infinite and a masked logit (the dtype's most negative value) never wins.
    """
    ids = torch.arange(width, device=keys.device)
    uniform = (_mix(keys[:, None] ^ ids).float() + 0.5) * 2.0**-32
    exponential = -torch.log1p(-uniform.clamp(max=1.0 - 2.0**-24))
    return -exponential.log()


def _unkeyed_gumbel(like: torch.Tensor) -> torch.Tensor:
    """Gumbel noise from torch's generator, as `generate` draws it: -log E, E ~ Exp(1) floored at the smallest
    normal float (an E of exactly 0 would give an infinite bonus, which lifts even a masked id to the top)."""
    return -torch.empty_like(like).exponential_().clamp_(min=torch.finfo(like.dtype).tiny).log()


# --- one step -----------------------------------------------------------------------------------------------
class Rule(NamedTuple):
    """How a step draws, as constants of the compiled step: greedy, top-k (0: off), top-p (1: off), the
    proposals per step, and whether the noise is keyed per sequence (else torch's generator draws it)."""

    greedy: bool
    top_k: int
    top_p: float
    proposals: int
    keyed: bool = True

    @classmethod
    def of(cls, sampling: Sampling, keyed: bool = True) -> Rule:
        nucleus = sampling.truncates and sampling.top_p < 1
        return cls(
            greedy=sampling.greedy,
            top_k=0 if sampling.greedy else sampling.top_k,
            top_p=sampling.top_p if nucleus else 1.0,
            proposals=proposals_for(sampling.top_p) if nucleus else 1,
            keyed=keyed,
        )

    def stall_budget(self, max_new_tokens: int) -> int:
        """Stalls a sequence may take (cache columns reserved for them); past it a draw is the top token."""
        if self.top_p >= 1:
            return 0
        expected = max_new_tokens * (1 - self.top_p) ** self.proposals
        return KV_BUCKET + math.ceil(4 * expected)


class Tags(NamedTuple):
    """The ids `thoughts.advance` reads, as constants."""

    think_start_id: int
    think_end_id: int


def proposals_for(top_p: float) -> int:
    """Independent proposals per step such that all miss a nucleus of mass >= top_p at most STALL_RATE of
    the time (at least 2, at most MAX_PROPOSALS)."""
    if top_p >= 1:
        return 1
    needed = math.ceil(math.log(STALL_RATE) / math.log(1 - top_p)) if top_p < 1 - 1e-12 else 1
    return min(MAX_PROPOSALS, max(2, needed))


def warp(logits, inside, forbidden, inv_temperature, rule: Rule):
    """fp32 logits under the thought mask, then the temperature, then top-k: Hugging Face's processors in
    their order (the masked and the cut ids hold the dtype's most negative value, so every sum stays finite).
    Top-p, which comes last, is applied by the draw (`choose`), which needs no sort."""
    lowest = torch.finfo(logits.dtype).min
    logits = (logits * inv_temperature).masked_fill(forbidden[inside.long()], lowest)
    if rule.top_k:
        kth = logits.topk(min(rule.top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, lowest)
    return logits


def in_nucleus(logprobs, tokens, top_p: float):
    """(B, R) bool: whether each of `tokens` (B, R) is in the top-p nucleus of its row, as Hugging Face's
    warper keeps it: the tokens sorted above it hold less than `top_p` of the mass. One sum over the
    vocabulary per token, no sort."""
    proposed = logprobs.gather(-1, tokens)
    probabilities = logprobs.exp()
    above = torch.stack(
        [(probabilities * (logprobs > proposed[:, i : i + 1])).sum(-1) for i in range(tokens.shape[1])], 1
    )
    return above < top_p


def choose(logits, inside, forbidden, inv_temperature, keys, force, rule: Rule):
    """The next token of each row under the thought mask, temperature, top-k and top-p, in that order.

    `keys` (B,) give each row's noise for this attempt. Top-p takes the first of `rule.proposals` independent
    draws that lands in the nucleus: rejection sampling, so an accepted token is a draw from the renormalised
    nucleus; a row with none is not accepted (it draws again next step), unless `force` (B,) says its stalls
    are spent, when it takes its most probable token. Returns (token, accepted, the token's log-prob under
    the distribution before top-p).
    """
    logits = warp(logits, inside, forbidden, inv_temperature, rule)
    normaliser = logits.logsumexp(-1, keepdim=True)
    if rule.greedy:
        token = logits.argmax(-1)
        accepted = torch.ones_like(token, dtype=torch.bool)
    else:
        width = logits.shape[-1]
        noises = (
            (_gumbel(_mix(keys ^ draw), width) for draw in range(rule.proposals))
            if rule.keyed
            else (_unkeyed_gumbel(logits) for _ in range(rule.proposals))
        )
        proposals = torch.stack([(logits + noise).argmax(-1) for noise in noises], 1)
        token, accepted = proposals[:, 0], torch.ones_like(proposals[:, 0], dtype=torch.bool)
        if rule.top_p < 1:
            kept = in_nucleus(logits - normaliser, proposals, rule.top_p)
            token = proposals.gather(-1, kept.int().argmax(-1, keepdim=True)).squeeze(-1)
            token = torch.where(force & ~kept.any(-1), logits.argmax(-1), token)
            accepted = kept.any(-1) | force
    logprob = logits.gather(-1, token.unsqueeze(-1)).squeeze(-1) - normaliser.squeeze(-1)
    return token, accepted, logprob


def _decode_step(
    runner,
    cache,
    cache_argument: str,
    token,
    position,
    visible,
    inside,
    live,
    emitted,
    stalls,
    keys,
    forbidden,
    eos,
    inv_temperature,
    limits,
    rule: Rule,
    tags: Tags,
    blocks: bool = False,
):
    """One token for every slot: forward the current token of each row (a 4D mask goes to the attention as
    it is: (batch, 1, 1, visible cache columns), or with `blocks` as the block mask of those columns, so that
    a row reads only the cache blocks it sees), choose, and advance the rows that emitted.

    A stalled row (no proposal in the nucleus) feeds the same token at the same position again; finished rows
    emit nothing. `limits` is (max new tokens, stall budget).
    """
    mask = block_attention.block_mask(visible[:, 0, 0]) if blocks else visible
    logits = (
        runner(
            input_ids=token.unsqueeze(-1),
            attention_mask=mask,
            position_ids=position.unsqueeze(-1),
            cache_position=cache.column,
            use_cache=True,
            **{cache_argument: cache},
        )
        .logits[:, -1]
        .float()
    )
    attempt = _mix(_mix(keys ^ emitted) ^ stalls)
    chosen, accepted, logprob = choose(
        logits, inside, forbidden, inv_temperature, attempt, stalls >= limits[1], rule
    )
    emit = live & accepted
    emitted = emitted + emit.long()
    stopped = emit & torch.isin(chosen, eos)
    return (
        chosen,
        emit,
        logprob,
        torch.where(emit, chosen, token),
        position + emit.long(),
        torch.where(emit, thoughts.advance(tags, inside, chosen), inside),
        live & ~stopped & (emitted < limits[0]),
        emitted,
        stalls + (live & ~accepted).long(),
    )


_COMPILED_STEP = None


def _compiled_step():
    """The decode step compiled once per process, with static shapes (the whole cache is visible to it): one
    compilation and one CUDA graph per cache shape."""
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        keep_compiled_kernels()
        # static, never "automatically dynamic": a second cache shape would otherwise recompile the step with
        # symbolic shapes, and on one H200 that graph's block attention was wrong by whole units against
        # float64 (BENCHMARKS.md); each shape gets its own graph instead, so the limit on recompilations must
        # leave room for every shape bucket of a process
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        _COMPILED_STEP = torch.compile(_decode_step, mode="reduce-overhead", dynamic=False, fullgraph=False)
    return _COMPILED_STEP


def _cache_argument(runner) -> str:
    """The name under which this transformers version's forward takes the cache."""
    return "cache" if "cache" in inspect.signature(type(runner).forward).parameters else "past_key_values"


# --- a batch of slots ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampled:
    """One finished sequence: its ids up to (without) its stop token, whether it stopped (else it ran out of
    tokens), and how many tokens it emitted (the stop token included)."""

    ids: list[int]
    stopped: bool
    emitted: int


class _Batch:
    """`batch` slots decoding together over one cache of `length` columns, used as a ring.

    A prompt's last token is the input of the slot's first decode step; the rest (`prefix` columns, left
    padded) is prefilled into the columns just behind the next one to be written. Each slot's sequence needs
    at most `prefix + max_new + stall budget` columns, which `length` holds, so the ring never overwrites a
    column its sequence still reads.
    """

    def __init__(
        self,
        fast: FastRollout,
        runner,
        cache: SlotCache,
        prefix: int,
        max_new: int,
        rule: Rule,
        pad: int,
        stop_ids: Sequence[int],
        inv_temperature: float,
    ):
        device = cache.column.device
        batch, length = cache.slot_keys[0].shape[0], cache.slot_keys[0].shape[2]
        self.fast, self.runner, self.cache, self.rule = fast, runner, cache, rule
        self.prefix, self.length, self.max_new, self.pad = prefix, length - SPARE_COLUMNS, max_new, pad
        vocab = fast.model.reasoning_vocab
        self.tags = Tags(vocab.think_start_id, vocab.think_end_id)
        forbidden = vocab.forbidden_table(device)  # columns the head adds past the vocabulary: never drawn
        self.forbidden = F.pad(forbidden, (0, logit_rows(runner) - forbidden.shape[1]), value=True)
        self.eos = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
        self.inv_temperature = torch.tensor(inv_temperature, device=device)
        self.limits = torch.tensor([max_new, rule.stall_budget(max_new)], device=device)
        self.cache_argument = _cache_argument(runner)
        self.step_fn = _compiled_step() if fast.compile else _decode_step
        self.token, self.position, self.emitted, self.stalls, self.keys = (
            torch.zeros(batch, dtype=torch.long, device=device) for _ in range(5)
        )
        self.inside = torch.zeros(batch, dtype=torch.bool, device=device)
        self.live = torch.zeros(batch, dtype=torch.bool, device=device)
        self.attention = torch.zeros(batch, self.length, dtype=torch.bool, device=device)
        self.out = torch.full((batch, max_new + 1), pad, dtype=torch.long, device=device)  # +1: a bin
        self.logprobs = torch.zeros(batch, max_new + 1, dtype=torch.float32, device=device)
        self.rows = torch.arange(batch, device=device)
        self.written = 0  # ring columns written since the cache was last empty

    @property
    def batch(self) -> int:
        return self.rows.shape[0]

    def fill(self, slots: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor) -> None:
        """Start the prompts `ids` (left padded, `mask` marking real tokens, at most `prefix + 1` wide) in
        `slots`, with noise `keys`."""
        device = self.rows.device
        if not bool(self.live.any()):  # nothing in flight: start the ring over, from column 0
            self.written = 0
            self.attention.zero_()
        if self.written < self.prefix:
            self.written = self.prefix
        width = ids.shape[1]
        ids = torch.nn.functional.pad(
            ids.masked_fill(mask == 0, self.pad), (self.prefix + 1 - width, 0), value=self.pad
        )
        mask = torch.nn.functional.pad(mask.bool(), (self.prefix + 1 - width, 0), value=False)
        columns = (self.written - self.prefix + torch.arange(self.prefix, device=device)) % self.length
        self._prefill(slots, ids[:, :-1], mask[:, :-1], columns)
        self.attention[slots] = False
        self.attention[slots[:, None], columns[None, :]] = mask[:, :-1]
        self.token[slots] = ids[:, -1]
        self.position[slots] = mask.sum(-1) - 1
        self.inside[slots] = thoughts.prompt_state(self.fast.model.reasoning_vocab, ids)
        self.live[slots] = True
        self.emitted[slots] = 0
        self.stalls[slots] = 0
        self.keys[slots] = keys
        self.out[slots] = self.pad
        self.logprobs[slots] = 0.0

    def _prefill(self, slots, prefixes, mask, columns) -> None:
        """Write the prompts' prefixes into the cache, each distinct prefix forwarded once."""
        unique, sources = torch.unique(torch.cat([prefixes, mask.long()], 1), dim=0, return_inverse=True)
        unique_ids, unique_mask = unique[:, : self.prefix], unique[:, self.prefix :].bool()
        positions = (unique_mask.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(self.prefix, self.prefix, dtype=torch.bool, device=slots.device).tril()
        diagonal = torch.eye(self.prefix, dtype=torch.bool, device=slots.device)
        chunk = max(1, PREFILL_TOKENS // max(1, self.prefix))
        for start in range(0, unique.shape[0], chunk):
            chosen = (sources >= start) & (sources < start + chunk)
            part = slice(start, start + chunk)
            # a padding position sees itself, so no attention row is empty (an empty one would make NaNs)
            allowed = causal & (unique_mask[part, None, :] | diagonal)
            with self.cache.prefill(slots[chosen], sources[chosen] - start, columns):
                self.runner(
                    input_ids=unique_ids[part],
                    attention_mask=allowed[:, None],
                    position_ids=positions[part],
                    cache_position=torch.arange(self.prefix, device=slots.device),
                    use_cache=True,
                    logits_to_keep=1,
                    **{self.cache_argument: self.cache},
                )

    def step(self) -> None:
        """One decode step of every slot (no wait for the device)."""
        column = self.written % self.length
        self.cache.column.fill_(column)
        self.attention[:, column] = True
        if self.fast.compile:
            # the compiled step sees the whole cache (masked): one shape, one graph. transformers' masking
            # specialises the visible length, so a dynamic one would compile again for every bucket; once
            # refilled slots have wrapped around the cache, every step sees all of it anyway
            visible = self.attention[:, None, None, :]
            torch.compiler.cudagraph_mark_step_begin()
        else:  # eagerly, a step reads only the cache columns in use so far
            seen = self.length if self.written >= self.length else _round_up(self.written + 1)
            visible = self.attention[:, None, None, : min(self.length, seen)]
        live = self.live
        state = self.step_fn(
            self.runner,
            self.cache,
            self.cache_argument,
            self.token,
            self.position,
            visible,
            self.inside,
            live,
            self.emitted,
            self.stalls,
            self.keys,
            self.forbidden,
            self.eos,
            self.inv_temperature,
            self.limits,
            self.rule,
            self.tags,
            self.fast.blocks,
        )
        # a replay overwrites its outputs in place: keep copies, which the next step reads
        state = [x.clone() for x in state] if self.fast.compile else state
        chosen, emit, logprob = state[:3]
        where = torch.where(emit, self.emitted, self.max_new)  # rows that emitted nothing write to the bin
        self.out[self.rows, where] = chosen
        self.logprobs[self.rows, where] = logprob
        # a stalled row's column holds a token it will feed again: it must not see it twice
        self.attention[:, column] &= emit | ~live
        self.token, self.position, self.inside, self.live, self.emitted, self.stalls = state[3:]
        self.written += 1

    def finished(self, slots: Sequence[int]) -> list[int]:
        """Which of `slots` (occupied) are done; waits for the device."""
        live = self.live.tolist()
        return [slot for slot in slots if not live[slot]]

    def results(self, slots: Sequence[int], stop_ids: Sequence[int]) -> list[Sampled]:
        index = torch.tensor(list(slots), device=self.rows.device)
        counts = self.emitted[index].tolist()
        rows = self.out[index].tolist()
        stops = set(stop_ids)
        done = []
        for row, count in zip(rows, counts, strict=True):
            stopped = count > 0 and row[count - 1] in stops
            done.append(Sampled(row[: count - 1] if stopped else row[:count], stopped, count))
        return done


def _round_up(value: int, multiple: int = KV_BUCKET) -> int:
    return -(-value // multiple) * multiple


def ring_columns(length: int) -> int:
    """The ring columns of a cache for sequences of up to `length` columns: `length` rounded up to a whole
    KV bucket, so that every slice a step attends over (the whole ring, or a multiple of KV_BUCKET of it)
    has an aligned length. The extra columns are never visible before they are written."""
    return _round_up(max(1, length))


def cache_columns(length: int) -> int:
    """The columns a cache for sequences of up to `length` columns allocates: its ring and the spare."""
    return ring_columns(length) + SPARE_COLUMNS


def _bucket(length: int, compiled: bool) -> int:
    """The prompt width a cache is built for: a multiple of PROMPT_BUCKET when the step is compiled (few
    shapes), else the width itself (an eager step costs what its cache holds)."""
    return max(PROMPT_BUCKET, _round_up(length, PROMPT_BUCKET)) if compiled else length


class FastRollout:
    """Per-model state of the fast path: the decoding module and its caches, keyed by (batch, cache length).

    With `dtype` set (bf16 for a model trained in fp32 under bf16 autocast) rollouts run on a copy of the
    weights in that dtype, refreshed before each rollout: the decode step then reads half the bytes and skips
    autocast's per-step weight casts, and the KV cache has one dtype.

    `own_copy` decodes on such a copy even in the model's own dtype. A sharded model needs it: under FSDP2
    each process holds a slice of every parameter (a DTensor), which the refresh gathers whole; under
    DeepSpeed ZeRO-3 the weights are whole only inside TRL's gather around `generate`. A copy also keeps the
    compiled decode step reading weights at fixed addresses, which sharding frees and reallocates. The copy
    is made on the device of the first rollout's inputs: a sharded model may still sit on the CPU when the
    trainer is built. Pointing `model` at another model of the same architecture makes the next rollout copy
    its weights into the same copy, so an evaluation of several checkpoints reuses one compiled step, one
    cache and one set of CUDA graphs.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        compile: bool | None = None,
        dtype: torch.dtype | None = None,
        own_copy: bool = False,
        blocks: bool | None = None,
    ):
        self.model = model
        self._model_class = type(model)  # before sharding, which may swap the class for a wrapper
        self.compile = compile  # None: compile when the first rollout decodes on a GPU
        # block attention (`rlvr.block_attention`); None: as `$RLVR_DECODE_ATTENTION` says, for compiled steps
        self.blocks = blocks
        self.dtype = dtype if dtype is not None and dtype != model.dtype else None
        self.copies = own_copy or self.dtype is not None
        self._shadow: PreTrainedModel | None = None
        self._caches: dict[tuple[int, int], SlotCache] = {}
        self.calls = 0  # rollouts served, for tests and logs
        self.loop = LoopTimes()  # where `sample`'s host time went, summed over its calls

    def _decide(self, device: torch.device) -> None:
        """Settle what was left to the first rollout: compile on a GPU, and there attend by blocks if asked to
        and the model's attention fits the block kernel."""
        if self.compile is None:
            self.compile = device.type == "cuda"
        if self.blocks is None:
            fits = block_attention.supports(self.model.config)
            self.blocks = bool(self.compile) and device.type == "cuda" and fits and block_attention.wanted()

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
            return bypass_kernel_routing(self.model)
        if self._shadow is None or self._shadow.device != device:
            shadow = self._empty_copy(device)
            shadow.tie_weights()
            for name, buffer in self.model.named_buffers():  # rotary frequencies stay in their own dtype
                shadow.get_buffer(name).copy_(buffer)
            _require_same_parameters(self.model, shadow)
            shadow = bypass_kernel_routing(shadow.eval().requires_grad_(False))
            self._shadow = pad_head(fuse_projections(shadow))
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

    def _cache(self, batch: int, length: int, runner, only: bool = False) -> SlotCache:
        """The cache for `batch` slots of at least `length` ring columns (`ring_columns`); with `only`, the
        caches of other shapes are freed first (an evaluation holds one at a time, as large as memory
        allows)."""
        columns = ring_columns(length)
        key = (batch, columns)
        if key not in self._caches:
            if only:
                self._release()
            device = next(runner.parameters()).device
            self._caches[key] = SlotCache(runner.config, batch, cache_columns(length), runner.dtype, device)
            log.info("fast decoding: a cache of %d slots and %d columns", batch, columns)
        return self._caches[key]

    def _release(self) -> None:
        self._caches.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: GenerationConfig
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_ids` followed by up to `max_new_tokens` sampled ids (padding after EOS), as `generate`
        returns, and each sampled token's log-prob (fp32) under the distribution it was drawn from (the masked
        softmax at the temperature: the training requests `rlvr.sampling.plain_request` admits)."""
        self._decide(input_ids.device)
        runner = self._runner(input_ids.device)
        sampling = Sampling.from_config(config)
        rule = Rule.of(sampling, keyed=False)  # a training batch is what it is: torch's generator draws
        batch, width = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prefix, max_new = _bucket(width, self.compile) - 1, config.max_new_tokens
        budget = rule.stall_budget(max_new)
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        with _attention(runner.config, DECODE_ATTENTION):
            cache = self._cache(batch, prefix + max_new + budget, runner)
            slots = _Batch(
                self,
                runner,
                cache,
                prefix,
                max_new,
                rule,
                pad,
                _as_list(config.eos_token_id),
                1.0 if sampling.greedy else 1.0 / sampling.temperature,
            )
            rows = torch.arange(batch, device=input_ids.device)
            slots.fill(rows, input_ids, attention_mask, torch.zeros_like(rows))
            for t in range(max_new + budget):
                slots.step()
                if (t + 1) % 32 == 0 and not bool(slots.live.any()):
                    break
        emitted = int(slots.emitted.max())
        self.calls += 1
        return torch.cat([input_ids, slots.out[:, :emitted]], 1), slots.logprobs[:, :emitted]

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling,
        *,
        samples: int,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        pad_id: int,
        seed: int,
        uids: Sequence[int] | None = None,
        batch_size: int | None = None,
        device: torch.device | str = "cpu",
        on_finished: Callable[[int, int, Sampled], None] | None = None,
    ) -> list[list[Sampled]]:
        """`samples` completions of each prompt (token ids, chat template applied), by slots refilled from a
        queue: prompts are grouped by length (one cache shape per PROMPT_BUCKET), and a slot whose sequence
        ended takes the next one. `batch_size` None sizes the batch from free accelerator memory
        (`auto_batch`). Sample `j` of prompt `i` draws noise keyed by (`seed`, `uids[i]`, `j`), so it is the
        same whatever else is sampled with it. `on_finished(i, j, sampled)` is called as each one ends."""
        device = torch.device(device)
        self._decide(device)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        runner = self._runner(device)
        rule = Rule.of(sampling)
        uids = list(range(len(prompts))) if uids is None else list(uids)
        results: list[list[Sampled | None]] = [[None] * samples for _ in prompts]
        groups: dict[int, list[int]] = {}
        group_size = PROMPT_BUCKET if self.compile else EAGER_GROUP
        for index in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
            groups.setdefault(_round_up(len(prompts[index]), group_size), []).append(index)
        job = _Job(prompts, samples, stop_ids, pad_id, seed, uids, results, on_finished, self.loop)
        with _attention(runner.config, DECODE_ATTENTION):
            for members in groups.values():
                bucket = _bucket(len(prompts[members[-1]]), self.compile)
                length = bucket - 1 + max_new_tokens + rule.stall_budget(max_new_tokens)
                sequences = len(members) * samples
                batch = min(batch_size or self.auto_batch(runner, length, sequences, device), sequences)
                cache = self._cache(batch, length, runner, only=True)
                slots = _Batch(
                    self,
                    runner,
                    cache,
                    bucket - 1,
                    max_new_tokens,
                    rule,
                    pad_id,
                    stop_ids,
                    1.0 if sampling.greedy else 1.0 / sampling.temperature,
                )
                job.run(slots, members, CHECK_EVERY if device.type == "cuda" else 1)
        self.calls += 1
        return results  # type: ignore[return-value]

    def auto_batch(self, runner, length: int, sequences: int, device: torch.device) -> int:
        """Slots for sequences of up to `length` cache columns: as many as the free accelerator memory holds
        (their KV cache and sampling buffers), at most MAX_AUTO_BATCH, spread so that full batches of a group
        take equal turns; CPU_AUTO_BATCH on a CPU."""
        if device.type != "cuda":
            return min(sequences, CPU_AUTO_BATCH)
        self._release()
        free, _ = torch.cuda.mem_get_info(device)
        vocabulary = runner.get_output_embeddings().weight.shape[0]
        per_slot = (
            SlotCache.bytes_per_row(runner.config, cache_columns(length), runner.dtype)
            + 4 * SAMPLING_COPIES * vocabulary
        )
        fits = int((free * MEMORY_SHARE - MEMORY_RESERVE) // per_slot)
        batch = max(1, min(MAX_AUTO_BATCH, fits, sequences))
        turns = -(-sequences // batch)
        return -(-sequences // turns)


@dataclass
class LoopTimes:
    """Host seconds of `FastRollout.sample`'s loop, by what the host did: `first` (the first round of steps of
    each cache shape, which compiles and records the step when the shape is new), then `fill` (starting
    sequences in free slots: their prompts' prefill included), `launch` (queueing decode steps), `report` (the
    callbacks for ended sequences), `wait` (waiting for the device to finish the queued steps, then reading
    which ended), and the decode `steps` run after the first rounds. Where `wait` is most of the total the
    device is the bottleneck; what the rest takes beyond the device's time is time the device sat idle."""

    first: float = 0.0
    fill: float = 0.0
    launch: float = 0.0
    report: float = 0.0
    wait: float = 0.0
    steps: int = 0

    def metrics(self, prefix: str) -> dict[str, float]:
        parts = {"fill": self.fill, "launch": self.launch, "report": self.report, "wait": self.wait}
        metrics = {f"{prefix}/{name}_s": seconds for name, seconds in {"first": self.first, **parts}.items()}
        metrics[f"{prefix}/steps"] = float(self.steps)
        if self.steps:
            metrics[f"{prefix}/ms_per_step"] = 1000 * sum(parts.values()) / self.steps
        return metrics


@dataclass
class _Job:
    """The queue of one `FastRollout.sample` call, fed to the batch of each prompt-length group in turn."""

    prompts: Sequence[Sequence[int]]
    samples: int
    stop_ids: Sequence[int]
    pad: int
    seed: int
    uids: Sequence[int]
    results: list
    on_finished: Callable[[int, int, Sampled], None] | None
    times: LoopTimes

    def run(self, slots: _Batch, members: Sequence[int], check_every: int) -> None:
        """Decode the group's sequences through `slots`. The callbacks for sequences that ended run while the
        device works on the next steps (they are launched first), so the host's work on finished sequences
        (decoding text, scoring) costs no decode time on an accelerator."""
        queue = deque((i, j) for i in members for j in range(self.samples))
        occupant: dict[int, tuple[int, int]] = {}
        free = list(range(slots.batch))
        threshold = max(1, slots.batch // REFILL_SHARE)
        ended: deque[tuple[int, int, Sampled]] = deque()
        interval = 0.0  # how long the device took for the last `check_every` steps
        times, clock, first = self.times, time.perf_counter, True
        while queue or occupant:
            started = clock()
            if queue and free and (len(free) >= min(threshold, len(queue)) or not occupant):
                taken = [queue.popleft() for _ in range(min(len(free), len(queue)))]
                chosen, free = free[: len(taken)], free[len(taken) :]
                self._fill(slots, chosen, taken)
                occupant.update(zip(chosen, taken, strict=True))
            filled = clock()
            for _ in range(check_every):
                slots.step()
            launched = clock()
            self._report(ended, filled + REPORT_SHARE * interval)
            reported = clock()
            done = slots.finished(list(occupant))
            for slot, sampled in zip(done, slots.results(done, self.stop_ids) if done else [], strict=True):
                i, j = occupant.pop(slot)
                self.results[i][j] = sampled
                free.append(slot)
                ended.append((i, j, sampled))
            waited = clock()
            interval = waited - filled
            if first:
                times.first += waited - started
                first = False
                continue
            times.fill += filled - started
            times.launch += launched - filled
            times.report += reported - launched
            times.wait += waited - reported
            times.steps += check_every
        started = clock()
        self._report(ended, math.inf)
        times.report += clock() - started

    def _report(self, ended: deque[tuple[int, int, Sampled]], until: float) -> None:
        """Call back for ended sequences, oldest first, until `until` (a `perf_counter` time): the rest wait
        for the next steps, so a batch whose sequences end together does not leave the device idle."""
        while ended and (self.on_finished is None or time.perf_counter() < until or until == math.inf):
            i, j, sampled = ended.popleft()
            if self.on_finished is not None:
                self.on_finished(i, j, sampled)

    def _fill(self, slots: _Batch, chosen: list[int], taken: list[tuple[int, int]]) -> None:
        device = slots.rows.device
        width = max(len(self.prompts[i]) for i, _ in taken)
        ids = torch.full((len(taken), width), self.pad, dtype=torch.long)
        mask = torch.zeros(len(taken), width, dtype=torch.long)
        for row, (i, _) in enumerate(taken):
            prompt = list(self.prompts[i])
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        uids = torch.tensor([self.uids[i] for i, _ in taken], device=device)
        keys = sequence_keys(self.seed, uids, torch.tensor([j for _, j in taken], device=device))
        slots.fill(torch.tensor(chosen, device=device), ids.to(device), mask.to(device), keys)


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


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)
