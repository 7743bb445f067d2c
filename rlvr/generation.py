"""Batched, constrained sampling from chat prompts, returning faithful text with per-token provenance.

Shared by the served model, evaluation and the training samples table, so every consumer sees completions the
same way: decoded with reasoning ids as their twins, split at the thought, with reasoning tokens counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlvr import thoughts
from rlvr.decoding import TokenSpan
from rlvr.rewards import answer_text, well_formed
from rlvr.rollout import FastRollout, Sampled
from rlvr.sampling import Sampling

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


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str | Messages]) -> list[list[int]]:
    """Each prompt chat-templated with the generation prompt, as token ids (the template adds the special
    tokens)."""
    texts = [
        tokenizer.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


@torch.inference_mode()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    batch_size: int | None = None,
    seed: int = 0,
    fast: FastRollout | None = None,
    device: torch.device | str | None = None,
    uids: Sequence[int] | None = None,
    on_finished: Callable[[int, int, Sampled], None] | None = None,
) -> list[list[Sampled]]:
    """`num_samples` constrained completions of each prompt (token ids from `prompt_ids`): through the fast
    decoder `fast` (on `device`; sample j of prompt i keyed by (`seed`, `uids[i]`, j)), or without one
    through the model's `generate`, in batches of `batch_size` (default 16) seeded once by `seed`."""
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    if fast is not None:
        return fast.sample(
            prompts, sampling, samples=num_samples, max_new_tokens=max_new_tokens, stop_ids=stops,
            pad_id=pad, seed=seed, uids=uids, batch_size=batch_size,
            device=device or next(model.parameters()).device, on_finished=on_finished,
        )  # fmt: skip
    torch.manual_seed(seed)
    options = (
        {
            "do_sample": True,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
        }
        if not sampling.greedy
        else {"do_sample": False}
    )
    device = next(model.parameters()).device
    flat = [(i, j) for i in range(len(prompts)) for j in range(num_samples)]
    results: list[list[Sampled]] = [[] for _ in prompts]
    step = batch_size or 16
    for start in range(0, len(flat), step):
        chunk = flat[start : start + step]
        width = max(len(prompts[i]) for i, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (i, _) in enumerate(chunk):
            ids[row, width - len(prompts[i]) :] = torch.tensor(list(prompts[i]))
            mask[row, width - len(prompts[i]) :] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            eos_token_id=stops, pad_token_id=pad, **options,
        )  # fmt: skip
        for (i, j), row in zip(chunk, out[:, width:].tolist(), strict=True):
            ids_until = thoughts.until_stop(row, stops)
            stopped = len(ids_until) < len(row)
            sampled = Sampled(ids_until, stopped, len(ids_until) + int(stopped))
            results[i].append(sampled)
            if on_finished is not None:
                on_finished(i, j, sampled)
    return results


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
    """`num_samples` constrained completions per prompt through the model's `generate` (greedy when
    `temperature == 0`), decoded with their thought structure."""
    ids = prompt_ids(tokenizer, prompts)
    sampled = sample(
        model, tokenizer, ids, Sampling(temperature, top_p=top_p), max_new_tokens=max_new_tokens,
        num_samples=num_samples, batch_size=batch_size, seed=0 if seed is None else seed,
    )  # fmt: skip
    return [
        describe_all(samples, prompt, tokenizer, model.reasoning_vocab)
        for prompt, samples in zip(ids, sampled, strict=True)
    ]


def describe_all(samples: Sequence[Sampled], prompt: Sequence[int], tokenizer, vocab) -> list[Generated]:
    """The completions of one prompt, described (`describe`), the thought state read from the prompt."""
    starts = bool(thoughts.prompt_state(vocab, torch.tensor([list(prompt)]))[0])
    return [describe(s.ids, tokenizer, vocab, starts) for s in samples]
