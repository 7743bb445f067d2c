"""Batched, constrained sampling from chat prompts, returning faithful text with per-token provenance.

Shared by the served model, evaluation and the training samples table, so every consumer sees completions the
same way: decoded with reasoning ids as their twins, split at the thought, with reasoning tokens counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlvr import thoughts
from rlvr.decoding import TokenSpan
from rlvr.rewards import answer_text, well_formed

Messages = list[dict[str, str]]


@dataclass
class Generated:
    """One sampled completion, split by its thought as the sampler saw it (`rlvr.thoughts`)."""

    token_ids: list[int]
    text: str
    spans: list[TokenSpan]
    thought: str
    answer: str
    closed: bool
    well_formed: bool
    reasoning_tokens: int
    structure: thoughts.Structure

    @property
    def thought_tokens(self) -> int:
        return self.structure.thought_tokens

    @property
    def answer_tokens(self) -> int:
        return self.structure.answer_tokens


def as_messages(prompt: str | Messages) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def describe(
    token_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase, vocab, starts_in_thought: bool = False
) -> Generated:
    """Decode one completion's ids (EOS and padding already removed) into a `Generated`.

    `starts_in_thought`: whether the prompt's chat template opened the thought (`thoughts.prompt_state`).
    """
    ids = [int(i) for i in token_ids]
    text, spans = tokenizer.decode_with_spans(ids, skip_special_tokens=True)
    parts = thoughts.structure(vocab, ids, starts_in_thought)
    tags = (vocab.think_start_id, vocab.think_end_id)
    thought_ids = [i for i, inside in zip(ids, parts.in_thought, strict=True) if inside and i not in tags]
    return Generated(
        token_ids=ids,
        text=text,
        spans=spans,
        thought=tokenizer.decode(thought_ids, skip_special_tokens=True).strip(),
        answer=answer_text(parts, ids, tokenizer) or "",
        closed=parts.closed,
        well_formed=well_formed(parts, ids, tokenizer),
        reasoning_tokens=sum(1 for i in ids if i >= vocab.base_vocab_size),
        structure=parts,
    )


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    return sorted(set(ids) | {tokenizer.eos_token_id})


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | Messages],
    *,
    max_new_tokens: int = 512,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    batch_size: int = 16,
    seed: int | None = 0,
) -> list[list[Generated]]:
    """`num_samples` constrained completions per prompt (greedy when `temperature == 0`)."""
    if seed is not None:
        torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    flat = [text for text in texts for _ in range(num_samples)]
    stops = stop_token_ids(model, tokenizer)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if temperature > 0
        else {"do_sample": False}
    )
    device = next(model.parameters()).device
    results: list[Generated] = []
    for start in range(0, len(flat), batch_size):
        batch = tokenizer(
            flat[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        )
        batch = batch.to(device)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        starts = thoughts.prompt_state(model.reasoning_vocab, batch["input_ids"]).tolist()
        for row, starts_inside in zip(out[:, batch["input_ids"].shape[1] :], starts, strict=True):
            ids = thoughts.until_stop(row.tolist(), stops)
            results.append(describe(ids, tokenizer, model.reasoning_vocab, starts_inside))
    return [results[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]
