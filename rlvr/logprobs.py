"""Log-probabilities under the constrained distribution, by a fused head that never holds `[tokens, vocab]`
logits.

TRL's GRPO trainer asks the model for per-token log-probs and entropies with
`model(input_ids=..., attention_mask=..., labels=..., fused_lm_head=True)` and reads `log_probs` and
`entropy` from the result. `constrained_forward` answers that call with the thought mask applied, so the
policy, old-policy and reference log-probs come from exactly the distribution that sampling used
(invariant 4); every other call goes to the model's own forward.

The head multiplies the final hidden states by the unembedding one tile at a time (up to 4096 tokens by
`VOCAB_CHUNK` rows), applies the temperature and the thought mask inside the tile, and folds the
tile into a running log-sum-exp, the chosen token's logit and the entropy's sum. The backward pass recomputes
each tile instead of storing it, so a 303k-row vocabulary costs one tile of memory whatever the batch. Rows no
token can be drawn from (padding) are never computed, and the reasoning rows are skipped for token chunks
outside every thought. On a GPU the per-tile arithmetic is compiled into a few fused kernels.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

from rlvr import thoughts
from rlvr.vocab import ReasoningVocab, ReasoningVocabError

# A tile is at most CHUNK_ELEMENTS logits: VOCAB_CHUNK rows by CHUNK_ELEMENTS // VOCAB_CHUNK tokens (4096 by
# default, so a training micro-batch is one or two token chunks). Its bf16 logits are 128 MiB; the backward
# pass holds two such tiles.
VOCAB_CHUNK = int(os.environ.get("RLVR_LOGPROB_VOCAB_CHUNK", "16384"))
CHUNK_ELEMENTS = int(os.environ.get("RLVR_LOGPROB_CHUNK_ELEMENTS", str(2**26)))
# compile the per-tile arithmetic: "auto" on GPUs only (a CPU compile costs more than it saves at test sizes)
COMPILE = os.environ.get("RLVR_COMPILE_LOGPROBS", "auto")
_MASKED = torch.finfo(torch.float32).min  # masked logits: the most negative finite value, never -inf


def _masked(logits, inv_temperature: float, inside, forbidden_inside, forbidden_outside):
    """A tile's tempered fp32 logits, each token's forbidden ids set to `_MASKED`, and that mask (None for
    rows that forbid nothing). Later steps work on this tensor in place."""
    z = logits.float() * inv_temperature
    if forbidden_inside is None:
        return z, None
    forbidden = torch.where(inside[:, None], forbidden_inside[None, :], forbidden_outside[None, :])
    return z.masked_fill_(forbidden, _MASKED), forbidden


def _fold(logits, inv_temperature: float, inside, forbidden_inside, forbidden_outside, column, state):
    """One tile folded into each token's running max m, sum of e = exp(z - m), sum of e (z - m) and chosen
    logit; `column` is each token's label relative to the tile's first row. Sums relative to m keep the
    entropy, log(sum e) - sum e (z - m) / sum e, free of the cancellation that large logits would cause."""
    z, forbidden = _masked(logits, inv_temperature, inside, forbidden_inside, forbidden_outside)
    running_max, sum_exp, sum_exp_shift, chosen = state
    hit = (column >= 0) & (column < z.shape[1])
    chosen = torch.where(hit, z.gather(1, column.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), chosen)
    new_max = torch.maximum(running_max, z.amax(-1))
    rescale = torch.exp(running_max - new_max)
    raised = (new_max - running_max) * sum_exp  # what moving the sums to the new max takes off their shifts
    shift = z.sub_(new_max[:, None])
    weights = shift.exp()
    if forbidden is not None:  # exactly 0, even where a tile forbids all of a token's ids (m is _MASKED then)
        weights.masked_fill_(forbidden, 0.0)
    sum_exp = sum_exp * rescale + weights.sum(-1)
    sum_exp_shift = (sum_exp_shift - raised) * rescale + weights.mul_(shift).sum(-1)
    return new_max, sum_exp, sum_exp_shift, chosen


def _tile_grad(
    logits,
    inv_temperature: float,
    inside,
    forbidden_inside,
    forbidden_outside,
    column,
    log_z,
    entropy,
    grad_logprob,
    grad_entropy,
    dtype: torch.dtype,
):
    """The loss's gradient w.r.t. a tile's logits, through the temperature: g_lp (onehot - p) from the
    label's log-prob and -g_H p (log p + H) from the entropy (either gradient may be absent); forbidden ids
    get exactly 0, as masking does."""
    z, forbidden = _masked(logits, inv_temperature, inside, forbidden_inside, forbidden_outside)
    log_p = z.sub_(log_z[:, None])
    p = log_p.exp()
    if grad_entropy is None:
        grad = p.mul_(-grad_logprob[:, None])
    else:
        if forbidden is not None:  # log p is about _MASKED there: keep it from overflowing below
            log_p.masked_fill_(forbidden, 0.0)
        grad = log_p.add_(entropy[:, None]).mul_(grad_entropy[:, None])
        if grad_logprob is not None:
            grad.add_(grad_logprob[:, None])
        grad = grad.mul_(p).neg_()
    if grad_logprob is not None:
        index = column.clamp(0, z.shape[1] - 1)[:, None]
        hit = (column >= 0) & (column < z.shape[1])
        if forbidden is not None:
            hit &= ~forbidden.gather(1, index).squeeze(1)
        grad.scatter_add_(1, index, torch.where(hit, grad_logprob, 0.0)[:, None])
    return grad.mul_(inv_temperature).to(dtype)


@functools.cache
def _kernels(device_type: str) -> tuple:
    """The per-tile functions for a device: compiled into fused kernels where that pays (dynamic shapes, so
    every tile and batch size shares one compilation), else eager."""
    if COMPILE == "never" or (COMPILE == "auto" and device_type != "cuda"):
        return _fold, _tile_grad
    from rlvr.rollout import keep_compiled_kernels

    keep_compiled_kernels()
    return (
        torch.compile(_fold, dynamic=True, fullgraph=True),
        torch.compile(_tile_grad, dynamic=True, fullgraph=True),
    )


def _accumulate(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`total += a @ b` with `total` in fp32 and the product never rounded to bf16 first (rounding each vocab
    chunk's contribution would bias the summed gradient)."""
    if a.dtype == torch.float32:
        total.addmm_(a, b)
    elif total.device.type == "cuda":
        torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    else:
        total.addmm_(a.float(), b.float())


@dataclass(frozen=True)
class _Rows:
    """One range of unembedding rows the head scores, with its slices of the forbidden table (None where
    the range forbids nothing in either state: no mask to apply)."""

    start: int
    stop: int
    inside_only: bool
    forbidden_inside: torch.Tensor | None
    forbidden_outside: torch.Tensor | None

    def chunks(self):
        for start in range(self.start, self.stop, VOCAB_CHUNK):
            stop = min(start + VOCAB_CHUNK, self.stop)
            if self.forbidden_inside is None:
                yield start, stop, None, None
            else:
                offset = slice(start - self.start, stop - self.start)
                yield start, stop, self.forbidden_inside[offset], self.forbidden_outside[offset]


def _scored_rows(vocab: ReasoningVocab, device: torch.device) -> list[_Rows]:
    """The row ranges to score (`vocab.drawable_rows`), each with the forbidden table's columns for it."""
    table, on_host = vocab.forbidden_table(device), vocab.forbidden_table("cpu")
    rows = []
    for start, stop, inside_only in vocab.drawable_rows():
        masked = bool(on_host[:, start:stop].any())
        forbidden = (table[1, start:stop], table[0, start:stop]) if masked else (None, None)
        rows.append(_Rows(start, stop, inside_only, *forbidden))
    return rows


def _token_chunks(tokens: int) -> list[slice]:
    """Equal token chunks of at most CHUNK_ELEMENTS // VOCAB_CHUNK tokens."""
    most = max(1, CHUNK_ELEMENTS // VOCAB_CHUNK)
    count = max(1, -(-tokens // most))
    size = -(-tokens // count) if tokens else 0
    return [slice(start, min(start + size, tokens)) for start in range(0, tokens, size or 1)]


def _logits(hidden, weight, bias):
    """One tile of logits in the compute dtype, as `F.linear` forms them (bias added in the product)."""
    return torch.mm(hidden, weight.t()) if bias is None else torch.addmm(bias, hidden, weight.t())


class ConstrainedLogProbs(torch.autograd.Function):
    """Per-token log-prob of `targets` and entropy under the masked, tempered softmax of
    `hidden @ weight.T + bias`, without materialising the logits in either pass."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, inside, rows: list, inv_temperature: float, gathered: tuple
    ):
        ctx.set_materialize_grads(False)  # the entropy is often only logged: no gradient to push back
        device = hidden.device
        dtype = (
            torch.get_autocast_dtype(device.type)
            if torch.is_autocast_enabled(device.type)
            else torch.promote_types(hidden.dtype, weight.dtype)
        )
        fold, _ = _kernels(device.type)
        tokens = hidden.shape[0]
        chunks = _token_chunks(tokens)
        running_max = torch.full((tokens,), _MASKED, device=device)
        sum_exp = torch.zeros(tokens, device=device)
        sum_exp_shift = torch.zeros(tokens, device=device)
        chosen = torch.full((tokens,), _MASKED, device=device)
        visits = _visits(rows, inside, chunks)
        cast = hidden.to(dtype)
        for rows_index, part in enumerate(rows):
            for start, stop, forbidden_inside, forbidden_outside in part.chunks():
                w = weight[start:stop].to(dtype)
                b = None if bias is None else bias[start:stop].to(dtype)
                for chunk, visit in zip(chunks, visits[rows_index], strict=True):
                    if not visit:
                        continue
                    state = (running_max[chunk], sum_exp[chunk], sum_exp_shift[chunk], chosen[chunk])
                    updated = fold(
                        _logits(cast[chunk], w, b),
                        inv_temperature,
                        inside[chunk],
                        forbidden_inside,
                        forbidden_outside,
                        targets[chunk] - start,
                        state,
                    )
                    for old, new in zip(state, updated, strict=True):
                        old.copy_(new)
        log_z = running_max + sum_exp.log()
        entropy = sum_exp.log() - sum_exp_shift / sum_exp
        ctx.save_for_backward(hidden, weight, bias, targets, inside, log_z, entropy)
        ctx.rows, ctx.inv_temperature, ctx.dtype, ctx.visits = rows, inv_temperature, dtype, visits
        ctx.gathered = gathered
        return chosen - log_z, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, bias, targets, inside, log_z, entropy = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        tokens, dtype = hidden.shape[0], ctx.dtype
        grad_logprob = None if grad_logprob is None else grad_logprob.float()
        grad_entropy = None if grad_entropy is None else grad_entropy.float()  # None: only logged
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device) if needs_hidden else None
        _, tile_grad = _kernels(hidden.device.type)
        chunks = _token_chunks(tokens)
        with maybe_gather_lm_head_ctx(*ctx.gathered):
            grad_weight = torch.zeros(weight.shape, device=weight.device) if needs_weight else None
            grad_bias = torch.zeros(bias.shape, device=bias.device) if needs_bias else None
            cast = hidden.to(dtype)
            for rows_index, part in enumerate(ctx.rows):
                for start, stop, forbidden_inside, forbidden_outside in part.chunks():
                    w = weight[start:stop].to(dtype)
                    b = None if bias is None else bias[start:stop].to(dtype)
                    for chunk, visit in zip(chunks, ctx.visits[rows_index], strict=True):
                        if not visit:
                            continue
                        grad = tile_grad(
                            _logits(cast[chunk], w, b),
                            ctx.inv_temperature,
                            inside[chunk],
                            forbidden_inside,
                            forbidden_outside,
                            targets[chunk] - start,
                            log_z[chunk],
                            entropy[chunk],
                            None if grad_logprob is None else grad_logprob[chunk],
                            None if grad_entropy is None else grad_entropy[chunk],
                            dtype,
                        )
                        if grad_hidden is not None:
                            _accumulate(grad_hidden[chunk], grad, w)
                        if grad_weight is not None:
                            _accumulate(grad_weight[start:stop], grad.t(), cast[chunk])
                        if grad_bias is not None:
                            grad_bias[start:stop] += grad.sum(0, dtype=torch.float32)
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def _visits(rows: list[_Rows], inside: torch.Tensor, chunks: list[slice]) -> list[list[bool]]:
    """Per row range and token chunk: whether any token of the chunk may draw from the range. Rows only a
    thought draws from are skipped for chunks without a token inside one; telling needs one host read, made
    only when such rows exist (never in the baseline)."""
    if not any(part.inside_only for part in rows):
        return [[True] * len(chunks) for _ in rows]
    any_inside = torch.stack([inside[chunk].any() for chunk in chunks]).tolist() if chunks else []
    return [any_inside if part.inside_only else [True] * len(chunks) for part in rows]


def constrained_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    vocab: ReasoningVocab,
    inside: torch.Tensor,
    temperature: float = 1.0,
    fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each label (T,) and the entropy of its masked, temperature-scaled distribution (fp32).

    `hidden` (T, H) are final hidden states and `inside` (T,) the thought state before each label. One pass
    scores every token, inside a thought or not: each tile applies each token's row of
    `vocab.forbidden_table`, so tokens are not split by state. `fp32` runs the projection in fp32 outside
    autocast (TRL's `cast_lm_head_to_fp32`). Under DeepSpeed ZeRO-3 the head's parameters are gathered for
    each pass, as the head reads them without calling their module.
    """
    gathered = tuple(p for p in (weight, bias) if isinstance(p, torch.nn.Parameter))
    with maybe_gather_lm_head_ctx(*gathered):
        weight, bias = (p.full_tensor() if isinstance(p, DTensor) else p for p in (weight, bias))
        if fp32:
            hidden, weight = hidden.float(), weight.float()
            bias = None if bias is None else bias.float()
        with torch.autocast(weight.device.type, enabled=False) if fp32 else contextlib.nullcontext():
            return ConstrainedLogProbs.apply(
                hidden,
                weight,
                bias,
                labels,
                inside.bool(),
                _scored_rows(vocab, weight.device),
                1.0 / temperature,
                gathered,
            )


def check_plain_head(model) -> None:
    """Refuse a model whose logits are more than its output embedding applied to the final hidden states.

    The constrained head computes logits itself from the hidden states, so a model that scales, caps or
    otherwise transforms them (softcapping, logit multipliers, ...) would train on a distribution other than
    the one it samples from. One short forward tells, whatever the config calls the transformation.
    """
    if getattr(model, "_rlvr_plain_head", False):
        return
    head = model.get_output_embeddings()
    if head.weight.device.type == "meta":
        return
    ids = torch.arange(4, device=head.weight.device).unsqueeze(0) % head.weight.shape[0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = type(model).forward(model, input_ids=ids, use_cache=False).logits.float()
            hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
            ours = F.linear(hidden, head.weight, getattr(head, "bias", None)).float()
    finally:
        model.train(was_training)
    if not (torch.isfinite(logits).all() and torch.isfinite(ours).all()):
        # a model that overflows cannot be judged here; the non-finite guards refuse it where it matters
        return
    tolerance = 1e-3 if head.weight.dtype == torch.float32 else 2e-2
    if not torch.allclose(logits, ours, rtol=tolerance, atol=tolerance * (1 + ours.abs().max().item())):
        raise ReasoningVocabError(
            f"{type(model).__name__} transforms its logits beyond its output embedding (e.g. softcapping or "
            "a logit multiplier); the constrained log-prob head supports models whose logits are a plain "
            "linear unembedding of the final hidden states."
        )
    model._rlvr_plain_head = True


def _completion_starts(labels: torch.Tensor) -> torch.Tensor:
    """Each row's first labelled column (TRL labels only completion columns), found without a host read."""
    return (labels != -100).int().argmax(1)


def constrained_forward(
    self, *args, fused_lm_head: bool = False, labels=None, completion_start=None, **kwargs
):
    """The model's forward; with `fused_lm_head=True`, TRL's per-token log-prob contract under the constraint.

    The thought state starts at the assistant turn, so the head must know where the prompt ends:
    `completion_start` (an int or per-row tensor), else each row's first labelled column, as TRL labels.
    Only labelled positions are scored; finding them is the head's one host read.
    """
    if not fused_lm_head:
        if labels is not None:
            kwargs["labels"] = labels
        return type(self).forward(self, *args, **kwargs)
    if args:
        raise TypeError("fused_lm_head=True expects keyword arguments (input_ids=..., attention_mask=...)")
    kwargs.pop("num_items_in_batch", None)
    if kwargs.pop("shift_labels", None) is not None:
        raise NotImplementedError(
            "pre-shifted labels (sequence parallelism) are not supported with a reasoning vocabulary"
        )
    input_ids = kwargs["input_ids"]
    kwargs["use_cache"] = False
    hidden = self.base_model(**kwargs).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    valid = targets != -100
    vocab = self.reasoning_vocab
    start = _completion_starts(labels) if completion_start is None else completion_start
    inside = thoughts.inside_after(vocab, input_ids, start)[:, :-1]
    head = self.get_output_embeddings()
    scored = valid.flatten().nonzero().squeeze(1)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored.to(hidden.device))
    log_probs, entropy = constrained_token_logprobs(
        hidden.to(head.weight.device),
        head.weight,
        getattr(head, "bias", None),
        targets.flatten()[scored],
        vocab,
        inside.flatten()[scored],
        temperature=self.reasoning_temperature,
        fp32=getattr(self, "reasoning_head_fp32", False),
    )
    # index_copy keeps an all-masked micro-batch connected to the graph (a differentiable zero)
    log_probs = log_probs.new_zeros(valid.numel()).index_copy(0, scored, log_probs).view(valid.shape)
    entropy = entropy.new_zeros(valid.numel()).index_copy(0, scored, entropy).view(valid.shape)
    loss = -log_probs.sum() / valid.sum().clamp(min=1)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, label_mask=valid)
