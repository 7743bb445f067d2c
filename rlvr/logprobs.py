"""Log-probabilities under the constrained distribution, computed in chunks so 300k-wide logits stay
affordable.

TRL's GRPO trainer asks the model for per-token log-probs and entropies with
`model(input_ids=..., attention_mask=..., labels=..., fused_lm_head=True)` and reads `log_probs` and
`entropy` from the result. `constrained_forward` answers that call with the thought mask applied, so the
policy, old-policy and reference log-probs come from exactly the distribution that sampling used
(invariant 4); every other call goes to the model's own forward.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, FusedCausalLMOutput

from rlvr import thoughts
from rlvr.vocab import ReasoningVocab, ReasoningVocabError

# Logit elements materialised per chunk (fp32): 2**26 is 256 MiB, ~220 tokens of a 303k-row vocabulary; the
# backward pass holds a few such buffers at once, so this bounds the head's transient memory to about 1 GiB.
CHUNK_ELEMENTS = int(os.environ.get("RLVR_LOGPROB_CHUNK_ELEMENTS", str(2**26)))


def _chunk_logprobs(hidden, weight, bias, labels, forbidden, inv_temperature: float, with_entropy: bool):
    logits = F.linear(hidden, weight, bias).float() * inv_temperature
    if forbidden is not None:
        logits = logits.masked_fill(forbidden, torch.finfo(torch.float32).min)
    log_z = logits.logsumexp(-1)
    log_probs = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - log_z
    if not with_entropy:
        return log_probs, None
    probs = torch.softmax(logits, -1)  # masked ids get exactly 0, so entropies stay finite
    return log_probs, log_z - (probs * logits).sum(-1)


def _chunked_logprobs(hidden, weight, bias, labels, forbidden, temperature: float, with_entropy: bool):
    """Log-probs and entropies of `labels` over `weight`'s rows, `forbidden` (V,) masked, one chunk at a
    time."""
    chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    log_probs, entropies = [], []
    for start in range(0, hidden.shape[0], chunk):
        args = (
            hidden[start : start + chunk],
            weight,
            bias,
            labels[start : start + chunk],
            forbidden,
            1.0 / temperature,
            with_entropy,
        )
        lp, ent = (
            checkpoint(_chunk_logprobs, *args, use_reentrant=False) if recompute else _chunk_logprobs(*args)
        )
        log_probs.append(lp)
        entropies.append(ent)
    return torch.cat(log_probs), torch.cat(entropies) if with_entropy else None


def constrained_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    vocab: ReasoningVocab,
    inside: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each label (T,) and the entropy of its masked, temperature-scaled distribution.

    `hidden` (T, H) are final hidden states and `inside` (T,) the thought state before each label. Outside a
    thought the allowed ids are exactly the tokenizer's, the first rows of the unembedding, so those positions
    are scored against that slice alone, by TRL's fused kernel: no mask, and a reasoning vocabulary costs
    nothing there. Inside, all rows are scored with the inside mask, in chunks recomputed in the backward pass
    rather than stored, so peak memory is one chunk of logits.
    """
    log_probs = hidden.new_zeros(labels.shape, dtype=torch.float32)
    entropies = hidden.new_zeros(labels.shape, dtype=torch.float32) if with_entropy else None
    forbidden_inside = vocab.forbidden_table(weight.device)[1]
    rows = vocab.tokenizer_size
    for state in (False, True):
        index = torch.nonzero(inside == state).flatten()
        if index.numel() == 0:
            continue
        if state:
            lp, ent = _chunked_logprobs(
                hidden[index], weight, bias, labels[index], forbidden_inside, temperature, with_entropy
            )
        else:  # nothing to mask: TRL's fused kernel over the tokenizer's rows
            outputs = ("log_probs", "entropy") if with_entropy else ("log_probs",)
            lp, ent, *_ = ChunkedLogProbFunction.apply(
                hidden[index],
                weight[:rows],
                None if bias is None else bias[:rows],
                labels[index],
                temperature,
                _CHUNKED_LOGPROB_CHUNK_SIZE,
                None,
                1.0,
                outputs,
            )
        log_probs = log_probs.index_copy(0, index, lp)
        if with_entropy:
            entropies = entropies.index_copy(0, index, ent)
    return log_probs, entropies


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


def _completion_start(labels: torch.Tensor) -> int:
    """TRL labels only completion columns (`labels[:, :-logits_to_keep] = -100`): the first labelled
    column."""
    labelled = (labels != -100).any(0).nonzero()
    return int(labelled[0]) if labelled.numel() else labels.shape[1]


def constrained_forward(
    self, *args, fused_lm_head: bool = False, labels=None, completion_start=None, **kwargs
):
    """The model's forward; with `fused_lm_head=True`, TRL's per-token log-prob contract under the constraint.

    The thought state starts at the assistant turn, so the head must know where the prompt ends:
    `completion_start` (an int or per-row tensor), else the first labelled column, as TRL labels.
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
    start = _completion_start(labels) if completion_start is None else completion_start
    inside = thoughts.inside_after(vocab, input_ids, start)[:, :-1]
    head = self.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    hidden = hidden[valid].to(weight.device)
    fp32 = getattr(self, "reasoning_head_fp32", False)
    if fp32:  # cast_lm_head_to_fp32: the projection in fp32, outside autocast
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    with torch.autocast(weight.device.type, enabled=False) if fp32 else contextlib.nullcontext():
        log_probs, entropy = constrained_token_logprobs(
            hidden,
            weight,
            bias,
            targets[valid],
            vocab,
            inside[valid],
            temperature=self.reasoning_temperature,
        )
    # masked_scatter keeps an all-masked micro-batch connected to the graph (a differentiable zero)
    log_probs = log_probs.new_zeros(valid.shape).masked_scatter(valid, log_probs)
    entropy = entropy.new_zeros(valid.shape).masked_scatter(valid, entropy)
    loss = -log_probs.sum() / valid.sum().clamp(min=1)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, label_mask=valid)
