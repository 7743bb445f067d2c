"""The thought structure of a sequence, read from token ids: the one answer to "is this inside the thought?".

The sampler, the GRPO loss, the rewards, the training metrics, evaluation, serving and analysis all ask this
module, so they agree token for token. The rules:

- A thought opens with the `<think>` id and closes with the `</think>` id. Text that merely spells a tag out
  in ordinary tokens (`"</" "think" ">"`) opens or closes nothing, however it decodes.
- The state starts at the assistant turn. Inside the prompt, every control token other than the two tags
  (`<|im_start|>`, `<|im_end|>`, padding, ...) ends any thought, so a `<think>` written in a system or user
  message cannot open a thought for the completion, while a chat template that opens the thought in its
  generation prompt (`<|im_start|>assistant\\n<think>\\n`) starts the completion inside it.
- Inside the completion only the two tags change the state.
- A completion's answer is what follows its last thought; one that ends inside a thought has no answer.
- A completion ends before its stop token (EOS), which is neither thought nor answer.

Counting thought, answer and reasoning tokens is this module's too (`Counts`), so training metrics and
evaluation agree number for number.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

THINK_START, THINK_END = "<think>", "</think>"


class ThoughtTags(Protocol):
    """The ids the structure is read from (a `ReasoningVocab` is one)."""

    think_start_id: int
    think_end_id: int
    base_vocab_size: int

    def turn_boundary_table(self, device: torch.device | str) -> torch.Tensor: ...


def inside_after(
    tags: ThoughtTags, ids: torch.Tensor, completion_start: int | torch.Tensor | None = None
) -> torch.Tensor:
    """`(B, L)` bool: whether each row is inside a thought after each position, by one vectorised scan.

    Positions before `completion_start` (an int, or `(B,)` per row; default: the whole row) are prompt, where
    turn-boundary tokens end a thought as `</think>` does. `state[:, -1]` of a prompt is where sampling
    starts.
    """
    length = ids.shape[-1]
    positions = torch.arange(length, device=ids.device).expand_as(ids)
    if completion_start is None:
        completion_start = length
    start = torch.as_tensor(completion_start, device=ids.device).reshape(-1, 1)
    boundary = tags.turn_boundary_table(ids.device)[ids.clamp(min=0, max=tags.base_vocab_size - 1)]
    resets = (ids == tags.think_end_id) | (boundary & (ids < tags.base_vocab_size) & (positions < start))
    none = torch.full_like(positions, -1)
    last_open = torch.where(ids == tags.think_start_id, positions, none).cummax(-1).values
    last_reset = torch.where(resets, positions, none).cummax(-1).values
    return last_open > last_reset


def prompt_state(tags: ThoughtTags, prompt_ids: torch.Tensor) -> torch.Tensor:
    """`(B,)` bool: whether sampling after these (left-padded) prompts starts inside a thought."""
    if prompt_ids.shape[-1] == 0:
        return torch.zeros(prompt_ids.shape[:-1], dtype=torch.bool, device=prompt_ids.device)
    return inside_after(tags, prompt_ids)[:, -1]


def advance(tags: ThoughtTags, inside: torch.Tensor, new_ids: torch.Tensor) -> torch.Tensor:
    """The state after appending `new_ids` (B,) to completions whose state was `inside` (B,): O(1) per
    token."""
    inside = torch.where(new_ids == tags.think_start_id, True, inside)
    return torch.where(new_ids == tags.think_end_id, False, inside)


def completion_states(
    tags: ThoughtTags, starts_inside: torch.Tensor, completion_ids: torch.Tensor
) -> torch.Tensor:
    """`(B, L)` bool: the state before each completion token, given the state at the end of each prompt."""
    opener = torch.full_like(completion_ids[:, :1], tags.think_start_id)
    # For the scan, a prompt that leaves the thought open is one `<think>`, and one that does not is one
    # `</think>`.
    opener = opener.masked_fill(~starts_inside.reshape(-1, 1).bool(), tags.think_end_id)
    after = inside_after(tags, torch.cat([opener, completion_ids], 1), completion_start=1)
    return after[:, :-1]


@dataclass(frozen=True)
class Structure:
    """One completion split by its thought, in token indices of the completion.

    `in_thought[t]` is true for tokens inside a thought, the tags that open and close it included; `answer` is
    `None` when the completion ends inside a thought, else the slice after the last thought token (all of it
    when there is no thought).
    """

    in_thought: tuple[bool, ...]
    thoughts: int
    closed: bool
    ends_inside: bool
    prefix: slice
    answer: slice | None
    reasoning_in_thought: int
    reasoning_in_answer: int

    @property
    def thought_tokens(self) -> int:
        return sum(self.in_thought)

    @property
    def answer_tokens(self) -> int:
        return 0 if self.answer is None else self.answer.stop - self.answer.start


def structure(tags: ThoughtTags, completion_ids: Sequence[int], starts_inside: bool = False) -> Structure:
    """The thought structure of one completion (its EOS and padding already removed)."""
    ids = [int(i) for i in completion_ids]
    if ids:
        before = completion_states(tags, torch.tensor([bool(starts_inside)]), torch.tensor([ids]))[0].tolist()
        ends_inside = bool(advance(tags, torch.tensor([before[-1]]), torch.tensor([ids[-1]]))[0])
    else:
        before, ends_inside = [], bool(starts_inside)
    in_thought = tuple(b or i == tags.think_start_id for b, i in zip(before, ids, strict=True))
    opened_here = sum(1 for b, i in zip(before, ids, strict=True) if not b and i == tags.think_start_id)
    thoughts = opened_here + int(bool(starts_inside))
    last_thought = max((t for t, inside in enumerate(in_thought) if inside), default=-1)
    first_thought = next((t for t, inside in enumerate(in_thought) if inside), len(ids))
    answer = None if ends_inside else slice(last_thought + 1, len(ids))
    reasoning = [i >= tags.base_vocab_size for i in ids]
    return Structure(
        in_thought=in_thought,
        thoughts=thoughts,
        closed=thoughts > 0 and not ends_inside,
        ends_inside=ends_inside,
        prefix=slice(0, 0 if starts_inside else first_thought),
        answer=answer,
        reasoning_in_thought=sum(r and t for r, t in zip(reasoning, in_thought, strict=True)),
        reasoning_in_answer=0 if answer is None else sum(reasoning[answer]),
    )


def until_stop(ids: Sequence[int], stop: Collection[int]) -> list[int]:
    """The completion up to (not including) its first stop token, which is neither thought nor answer;
    samplers pad only after it."""
    ids = [int(i) for i in ids]
    for position, token in enumerate(ids):
        if token in stop:
            return ids[:position]
    return ids


@dataclass(frozen=True)
class Counts:
    """Token counts over completions, each read up to its stop token (`until_stop`): what training logs as
    `reasoning/*` and evaluation as `thought_length`, `answer_length` and `reasoning_share`, so both report
    the same numbers for the same completions. Thought tokens include the tags; answer tokens are those after
    the last thought (none for a completion that ends inside one), so text before a thought is in neither."""

    completions: float = 0.0
    thought_tokens: float = 0.0
    answer_tokens: float = 0.0
    reasoning_tokens: float = 0.0  # reasoning ids inside thoughts
    closed: float = 0.0  # completions that closed their thought and ended outside it

    @classmethod
    def of(cls, structures: Iterable[Structure]) -> Counts:
        structures = list(structures)
        return cls(
            completions=float(len(structures)),
            thought_tokens=float(sum(s.thought_tokens for s in structures)),
            answer_tokens=float(sum(s.answer_tokens for s in structures)),
            reasoning_tokens=float(sum(s.reasoning_in_thought for s in structures)),
            closed=float(sum(s.closed for s in structures)),
        )

    @property
    def thought_length(self) -> float:
        return self.thought_tokens / max(self.completions, 1.0)

    @property
    def answer_length(self) -> float:
        return self.answer_tokens / max(self.completions, 1.0)

    @property
    def reasoning_share(self) -> float:
        return self.reasoning_tokens / self.thought_tokens if self.thought_tokens else 0.0

    @property
    def closed_rate(self) -> float:
        return self.closed / max(self.completions, 1.0)


def batch_counts(
    tags: ThoughtTags,
    before: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    stop_ids: Collection[int],
) -> torch.Tensor:
    """`Counts` of a right-padded batch, as a tensor in the order of its fields (to sum across processes), by
    the rules `structure` applies to each row. `before`: `completion_states` of the batch; `completion_mask`
    covers the sampled tokens, a stop token included."""
    stops = torch.isin(completion_ids, torch.tensor(sorted(stop_ids), device=completion_ids.device))
    content = completion_mask.bool() & (torch.cumsum(stops, 1) == 0)  # the tokens before the first stop
    lengths = content.sum(1)
    in_thought = (before | (completion_ids == tags.think_start_id)) & content
    last = (lengths - 1).clamp(min=0).unsqueeze(1)
    starts_inside = before[:, 0]
    after_last = advance(tags, before.gather(1, last).squeeze(1), completion_ids.gather(1, last).squeeze(1))
    ends_inside = torch.where(lengths > 0, after_last, starts_inside)
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    last_thought = torch.where(in_thought, positions, -1).max(1).values
    answer = torch.where(ends_inside, 0, lengths - (last_thought + 1))
    had_thought = starts_inside | ((completion_ids == tags.think_start_id) & content).any(1)
    reasoning = (completion_ids >= tags.base_vocab_size) & in_thought
    counts = [
        content.shape[0],
        in_thought.sum(),
        answer.sum(),
        reasoning.sum(),
        (had_thought & ~ends_inside).sum(),
    ]
    return torch.tensor([float(c) for c in counts], device=completion_ids.device)
