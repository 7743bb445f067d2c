"""A decoding copy of a model whose attention and MLP input projections are one matrix product each.

At small batches a decode step is bound by kernel count, not bytes: each layer's query, key and value
projections and its gate and up projections are five products too small to fill a GPU. In the copy that
rollouts decode on (`rlvr.rollout.FastRollout`), each such group becomes one product over the concatenated
weights, and the original projection modules become slices of its output. The layer's own forward runs
unchanged around them (norms, rotary embedding, cache, attention), so the copy computes what the model
computes, in fewer kernels.

The weights are concatenated once, when the copy is built; each rollout then copies the model's current
weights into their slices (`decode_targets`), as it does for every other parameter.

The copy's output head gets rows appended up to a multiple of `HEAD_ROWS` (`pad_head`): with N = 151646
reasoning rows a Qwen3 head has 303,582 rows, and a logits row of that many bf16 values is not 16-byte
aligned, which on one H200 sent the unembedding product to a slower fallback kernel (BENCHMARKS.md). The rows
appended hold zeros and are forbidden to every draw, like the vocabulary's own padding rows.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

# Module classes whose forward uses these projections only as `projection(hidden_states)`, and
# `hidden_states` itself only for its leading shape: their inputs may be one product, sliced.
FUSABLE = {
    ("q_proj", "k_proj", "v_proj"): {
        "Qwen3Attention",
        "Qwen2Attention",
        "LlamaAttention",
        "MistralAttention",
    },
    ("gate_proj", "up_proj"): {"Qwen3MLP", "Qwen2MLP", "LlamaMLP", "MistralMLP"},
}
_TARGETS = "_rlvr_decode_targets"
HEAD_ROWS = 64  # the decoding copy's output head has a multiple of this many rows


class _Slice(nn.Module):
    """Stands in for one projection: its columns of the fused product."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return fused[..., self.start : self.stop]


class FusedInputs(nn.Module):
    """`inner` with its input projections `names` computed as one product; `inner` then receives that product
    in place of its input and its projections slice it."""

    def __init__(self, inner: nn.Module, names: tuple[str, ...]):
        super().__init__()
        projections = [getattr(inner, name) for name in names]
        self.weight = nn.Parameter(torch.cat([p.weight for p in projections]), requires_grad=False)
        biases = [p.bias for p in projections]
        fused_bias = torch.cat(biases) if all(b is not None for b in biases) else None
        self.bias = None if fused_bias is None else nn.Parameter(fused_bias, requires_grad=False)
        self.spans: dict[str, tuple[int, int]] = {}
        start = 0
        for name, projection in zip(names, projections, strict=True):
            stop = start + projection.weight.shape[0]
            self.spans[name] = (start, stop)
            setattr(inner, name, _Slice(start, stop))
            start = stop
        self.inner = inner

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.inner(F.linear(hidden_states, self.weight, self.bias), *args, **kwargs)


def _fusable(module: nn.Module, names: tuple[str, ...]) -> bool:
    projections = [getattr(module, name, None) for name in names]
    if type(module).__name__ not in FUSABLE[names] or not all(isinstance(p, nn.Linear) for p in projections):
        return False
    return len({p.in_features for p in projections}) == 1 and len({p.bias is None for p in projections}) == 1


def fuse_projections(twin: PreTrainedModel) -> PreTrainedModel:
    """Fuse `twin`'s attention and MLP input projections in place, where its architecture is known; returns
    it. `decode_targets(twin)` then maps each of the model's parameter names to where its values go."""
    targets = dict(twin.named_parameters())
    fused = []
    for name, module in list(twin.named_modules()):
        for names in FUSABLE:
            if _fusable(module, names):
                fused.append((name, module, names))
    for name, module, names in fused:
        parent_name, _, attribute = name.rpartition(".")
        wrapper = FusedInputs(module, names)
        setattr(twin.get_submodule(parent_name), attribute, wrapper)
        for projection, (start, stop) in wrapper.spans.items():
            prefix = f"{name}.{projection}"
            targets[f"{prefix}.weight"] = wrapper.weight[start:stop]
            if wrapper.bias is not None:
                targets[f"{prefix}.bias"] = wrapper.bias[start:stop]
    setattr(twin, _TARGETS, targets)
    return twin


def decode_targets(twin: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Where each parameter of the model goes in its decoding copy, by the model's parameter names: the
    copy's own parameter, or a fused projection's slice of its concatenated weight."""
    return getattr(twin, _TARGETS, None) or dict(twin.named_parameters())


def pad_head(twin: PreTrainedModel, multiple: int = HEAD_ROWS) -> PreTrainedModel:
    """Append zero rows to `twin`'s output head (a bias-free linear layer) up to a multiple of `multiple`, in
    place; returns it. The model's parameter that fills the head (the input embedding, when the two are tied)
    then fills the head's leading rows (`decode_targets`). The logits have `logit_rows(twin)` columns; those
    past the vocabulary must be masked by whoever draws from them."""
    head = twin.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return twin
    rows, width = head.weight.shape
    padded_rows = -(-rows // multiple) * multiple
    if padded_rows == rows:
        return twin
    old = head.weight
    padded = torch.zeros(padded_rows, width, dtype=old.dtype, device=old.device)
    padded[:rows] = old.detach()
    leading = nn.Parameter(padded[:rows], requires_grad=False)  # shares the padded storage
    embedding = twin.get_input_embeddings()
    if embedding is not None and embedding.weight is old:
        embedding.weight = leading
    head.weight = nn.Parameter(padded, requires_grad=False)
    targets = decode_targets(twin)
    setattr(twin, _TARGETS, {name: leading if t is old else t for name, t in targets.items()})
    return twin


def logit_rows(model: PreTrainedModel) -> int:
    """Columns of the logits `model` computes: its vocabulary, padded as `pad_head` left its head."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(model.config.vocab_size)


def bypass_kernel_routing(model: torch.nn.Module) -> torch.nn.Module:
    """Give each submodule of `model` that carries `kernels`' routing wrapper its class's forward beneath it
    (an instance attribute; in place, idempotent); returns `model`. The functions the wrapper would route
    (e.g. the rotary embedding) then run as they would with no kernel mapped, which is what they run here
    anyway: only the context variable the wrapper sets, which a compiled graph leaves set, goes."""
    for module in model.modules():
        wrapped = getattr(type(module).forward, "__wrapped__", None)
        if wrapped is not None and "_kernel_funcs" in module.__dict__ and "forward" not in module.__dict__:
            module.forward = types.MethodType(wrapped, module)
    return model
