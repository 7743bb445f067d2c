"""Entropy inside thoughts, read on one text for every checkpoint and both runs, so that a change in entropy
is the model's and not the text's.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlvr import thoughts
from rlvr.generation import as_messages


def teacher_forced(
    frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int
) -> list[tuple[list[int], int]]:
    """(prompt + worked solution ids, prompt length), the solution as one thought (wrapped in the thought tags
    when its ids hold none), cut to `max_new_tokens`; empty when the data has no worked solutions."""
    vocab = tokenizer.reasoning_vocab
    sequences = []
    for messages, reference in zip(frame["prompt"], frame["reference"], strict=True):
        if not reference.strip():
            continue
        completion = tokenizer.encode(reference, add_special_tokens=False)
        if vocab.think_start_id not in completion:
            newline = tokenizer.encode("\n", add_special_tokens=False)
            completion = [vocab.think_start_id, *newline, *completion, *newline, vocab.think_end_id]
        prompt = tokenizer.encode(
            tokenizer.apply_chat_template(as_messages(messages), tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )
        sequences.append((prompt + completion[:max_new_tokens], len(prompt)))
    return sequences


@torch.inference_mode()
def thought_entropy(
    model: PreTrainedModel, sequences: Sequence[tuple[Sequence[int], int]], pad_id: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input token and entropy of the constrained next-token distribution, at every completion position inside
    a thought, for (ids, prompt length) pairs.

    Uses the same log-prob head as the GRPO loss (`fused_lm_head=True`), so the entropy is that of the masked
    distribution sampling draws from, and the thought state starts at each prompt's assistant turn.
    """
    vocab = model.reasoning_vocab
    device = next(model.parameters()).device
    tokens, entropies = [], []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        ids = torch.full((len(batch), max(len(s) for s, _ in batch)), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labelled = torch.zeros_like(ids, dtype=torch.bool)
        for row, (sequence, prompt_length) in enumerate(batch):
            ids[row, : len(sequence)] = torch.tensor(list(sequence))
            mask[row, : len(sequence)] = 1
            labelled[row, prompt_length : len(sequence)] = True
        prompt_lengths = torch.tensor([p for _, p in batch])
        ids, mask, labelled, prompt_lengths = (
            ids.to(device),
            mask.to(device),
            labelled.to(device),
            prompt_lengths.to(device),
        )
        out = model(
            input_ids=ids,
            attention_mask=mask,
            labels=ids.masked_fill(~labelled, -100),
            fused_lm_head=True,
            completion_start=prompt_lengths,
        )
        inside = thoughts.inside_after(vocab, ids, prompt_lengths)[:, :-1] & out.label_mask
        tokens.append(ids[:, :-1][inside].cpu())
        entropies.append(out.entropy[inside].float().cpu())
    if not tokens:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(tokens), torch.cat(entropies)
