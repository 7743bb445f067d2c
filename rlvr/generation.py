"""Batched, constrained sampling from chat prompts, returning faithful text with per-token provenance.

Shared by the served model, evaluation and the training samples table, so every consumer sees completions the
same way: decoded with reasoning ids as their twins, split at the thought, with reasoning tokens counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlvr.rewards import split_completion
from rlvr.tokenizer import TokenSpan

Messages = list[dict[str, str]]


@dataclass
class Generated:
    """One sampled completion."""

    token_ids: list[int]
    text: str
    spans: list[TokenSpan]
    thought: str
    answer: str
    closed: bool
    thought_tokens: int
    reasoning_tokens: int

    @property
    def answer_tokens(self) -> int:
        return len(self.token_ids) - self.thought_tokens


def as_messages(prompt: str | Messages) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def describe(token_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase, vocab) -> Generated:
    """Decode one completion's ids (EOS and padding already removed) into a `Generated`."""
    ids = [int(i) for i in token_ids]
    text, spans = tokenizer.decode_with_spans(ids, skip_special_tokens=True)
    parts = split_completion(text)
    inside = vocab.thought_state(torch.tensor([ids], dtype=torch.long))[0].tolist() if ids else []
    # a token belongs to the thought if the state before it was inside, or it opens the thought
    in_thought = [(i > 0 and inside[i - 1]) or ids[i] == vocab.think_start_id for i in range(len(ids))]
    return Generated(
        token_ids=ids,
        text=text,
        spans=spans,
        thought=parts.thought,
        answer=parts.answer,
        closed=parts.closed,
        thought_tokens=sum(in_thought),
        reasoning_tokens=sum(1 for i in ids if i >= vocab.base_vocab_size),
    )


def until_stop(ids: torch.Tensor, stop_ids: Sequence[int]) -> list[int]:
    """The completion up to (not including) its first stop token; `generate` pads only after that."""
    out = []
    for token in ids.tolist():
        if token in stop_ids:
            break
        out.append(token)
    return out


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
        tokenizer.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True) for p in prompts
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
        batch = tokenizer(flat[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(device)
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, **sampling
        )
        for row in out[:, batch["input_ids"].shape[1] :]:
            results.append(describe(until_stop(row, stops), tokenizer, model.reasoning_vocab))
    return [results[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]
