"""Divergence never passes silently: a non-finite gradient stops training before the optimizer applies it, so
the last checkpoint stays finite and nothing non-finite is registered; a model with non-finite weights is
refused."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, TrainerCallback

from rlvr.errors import InputError, UserFacingError


def avoid_cudnn_attention_backward() -> None:
    """Train without cuDNN's fused attention kernel.

    Under bf16 on an H200 its backward pass (`ScaledDotProductCudnnAttentionBackward0`) returned NaN gradients
    from finite inputs on left-padded GRPO batches, intermittently, tens of steps into a run (found with
    autograd's anomaly detection; BENCHMARKS.md). PyTorch then picks its flash, memory-efficient or math
    kernels instead.
    """
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


class TrainingDiverged(UserFacingError):
    """Training produced a non-finite loss or gradient: reported in one line, and the run is FAILED."""


def non_finite_parameters(model: torch.nn.Module, limit: int = 3) -> list[str]:
    """Names of (at most `limit`) parameters holding a NaN or an infinity."""
    found = []
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            found.append(name)
            if len(found) == limit:
                break
    return found


def require_finite_weights(model: PreTrainedModel, source: str) -> None:
    bad = non_finite_parameters(model)
    if bad:
        raise InputError(
            f"model {source!r} has non-finite weights ({', '.join(bad)}); it comes from a diverged training: "
            "use one of its earlier checkpoints instead."
        )


class StopOnNonFinite(TrainerCallback):
    """Checks the accumulated gradients before every optimizer step (one fused norm over all of them).

    A NaN or infinite loss reaches the gradients, so this also catches it. Raising here leaves the weights as
    the last step left them, and the newest checkpoint on disk is finite.
    """

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return control
        total = torch.nn.utils.get_total_norm(grads)
        if not torch.isfinite(total):
            raise TrainingDiverged(
                f"training diverged at step {state.global_step + 1}: the gradient norm is {total.item()}; "
                f"nothing was registered, and the last checkpoint in {args.output_dir} holds finite weights. "
                "Lower learning_rate, or check the data and the reward."
            )
        return control
