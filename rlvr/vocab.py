"""The reasoning vocabulary: N extra embedding/unembedding rows that may be sampled only inside a thought.

Row `E + i` of an expanded model starts as a copy of standard row `s_i`. Inside `<think> ... </think>` the
sampler may pick standard or reasoning ids; outside only standard ids. Ids that are no token (padding rows
past the tokenizer) and reasoning copies of control tokens are never sampled, so a thought ends only with the
standard `</think>` and an answer only with the standard EOS. `N = 0` is the baseline and runs the same code.

Where a thought begins and ends is read from ids by `rlvr.thoughts`; how a model is made to obey the map
(generate, the log-prob head, saving) is `rlvr.surgery`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from rlvr.errors import InputError
from rlvr.thoughts import THINK_END, THINK_START

TOKEN_MAP_FILE = "reasoning_token_map.json"


class ReasoningVocabError(InputError):
    """A reasoning-vocabulary request that cannot be honoured; the message names the input and the fix."""


@dataclass(frozen=True)
class ReasoningVocab:
    """The token map of a model with `N = len(standard_token_ids)` reasoning rows appended after
    `base_vocab_size`.

    `tokenizer_size` is the number of real token ids; rows `tokenizer_size .. base_vocab_size - 1` are
    padding. `control_token_ids` are the tokenizer's added/special ids, whose reasoning copies are never
    sampled.
    """

    base_vocab_size: int
    tokenizer_size: int
    think_start_id: int
    think_end_id: int
    standard_token_ids: tuple[int, ...] = ()
    control_token_ids: tuple[int, ...] = ()
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def for_tokenizer(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        base_vocab_size: int,
        size: int,
        standard_token_ids: Sequence[int] | None = None,
    ) -> ReasoningVocab:
        """Validate a request for `size` reasoning rows copied from `standard_token_ids` (default:
        0..size-1)."""
        tokenizer_size = len(tokenizer)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ReasoningVocabError(
                f"reasoning_vocab_size must be a non-negative integer (0 for the baseline), got {size!r}."
            )
        if tokenizer_size > base_vocab_size:
            raise ReasoningVocabError(
                f"the tokenizer has {tokenizer_size} ids but the model only {base_vocab_size} embedding "
                "rows; load a tokenizer that matches the model."
            )
        if standard_token_ids is None:
            if size > tokenizer_size:
                raise ReasoningVocabError(
                    f"reasoning_vocab_size={size} exceeds the {tokenizer_size} standard token ids; use at "
                    f"most {tokenizer_size}, or pass standard_token_ids that repeat ids to get copies of "
                    "multiplicity > 1."
                )
            standard_token_ids = range(size)
        standard_token_ids = tuple(int(i) for i in standard_token_ids)
        if len(standard_token_ids) != size:
            raise ReasoningVocabError(
                f"standard_token_ids has {len(standard_token_ids)} entries but reasoning_vocab_size is "
                f"{size}; give one standard id per reasoning row."
            )
        bad = [i for i in standard_token_ids if not 0 <= i < tokenizer_size]
        if bad:
            raise ReasoningVocabError(
                f"standard_token_ids {bad[:5]} are not token ids of the tokenizer (valid: "
                f"0..{tokenizer_size - 1}; rows {tokenizer_size}..{base_vocab_size - 1} are padding); choose "
                "ids of real tokens."
            )
        think_ids = tokenizer.convert_tokens_to_ids([THINK_START, THINK_END])
        unk = tokenizer.unk_token_id
        if any(i is None or (unk is not None and i == unk) for i in think_ids):
            raise ReasoningVocabError(
                f"the tokenizer has no single-token {THINK_START!r}/{THINK_END!r}, by which rlvr reads "
                "thoughts; add both as tokens (and resize the model) before training or evaluating it."
            )
        control = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        return cls(
            base_vocab_size=base_vocab_size,
            tokenizer_size=tokenizer_size,
            think_start_id=think_ids[0],
            think_end_id=think_ids[1],
            standard_token_ids=standard_token_ids,
            control_token_ids=tuple(sorted(control)),
        )

    # --- sizes and the map -------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.standard_token_ids)

    @property
    def total_size(self) -> int:
        return self.base_vocab_size + self.size

    @property
    def multiplicities(self) -> tuple[int, ...]:
        """Per reasoning row: 1 for the first copy of its standard id, 2 for the second, ..."""
        cached = self._tables.get("multiplicities")
        if cached is None:
            seen: dict[int, int] = {}
            out = []
            for s in self.standard_token_ids:
                seen[s] = seen.get(s, 0) + 1
                out.append(seen[s])
            cached = self._tables["multiplicities"] = tuple(out)
        return cached

    def to_standard(self, ids: Sequence[int]) -> list[int]:
        """Each reasoning id replaced by its standard twin; other ids unchanged."""
        base, twins = self.base_vocab_size, self.standard_token_ids
        return [twins[i - base] if i >= base else i for i in map(int, ids)]

    def multiplicity_of(self, token_id: int) -> int:
        return self.multiplicities[token_id - self.base_vocab_size] if token_id >= self.base_vocab_size else 0

    def is_reasoning(self, ids: torch.Tensor) -> torch.Tensor:
        return ids >= self.base_vocab_size

    # --- what the thought structure is read from -----------------------------------------------------------
    def turn_boundary_table(self, device: torch.device | str) -> torch.Tensor:
        """`(E,)` bool: the control ids other than the thought tags, which end a thought inside a prompt."""
        device = torch.device(device)
        key = ("boundary", device)
        table = self._tables.get(key)
        if table is None:
            table = torch.zeros(self.base_vocab_size, dtype=torch.bool)
            table[list(self.control_token_ids)] = True
            table[[self.think_start_id, self.think_end_id]] = False
            table = self._tables[key] = table.to(device)
        return table

    # --- the sampling mask ----------------------------------------------------------------------------------
    def forbidden_table(self, device: torch.device | str) -> torch.Tensor:
        """`(2, E + N)` bool: row 0 the ids forbidden outside a thought, row 1 those forbidden inside."""
        device = torch.device(device)
        table = self._tables.get(device)
        if table is None:
            table = torch.zeros(2, self.total_size, dtype=torch.bool)
            table[:, self.tokenizer_size : self.base_vocab_size] = True  # padding rows: no token
            table[0, self.base_vocab_size :] = True  # confinement: reasoning ids only inside a thought
            if self.size:
                twins = torch.tensor(self.standard_token_ids)
                control = torch.tensor(self.control_token_ids, dtype=twins.dtype)
                table[1, self.base_vocab_size :] = torch.isin(twins, control)  # copies of control tokens
            table = self._tables[device] = table.to(device)
        return table

    def drawable_rows(self) -> tuple[tuple[int, int, bool], ...]:
        """The rows a token can ever be drawn from, as `(start, stop, inside_only)` ranges: the tokenizer's
        ids, then (N > 0) the reasoning rows, which only a thought draws from. The padding rows between them
        are forbidden in both states, so a scorer may skip them; which ids of a range are forbidden in which
        state is still `forbidden_table`'s to say."""
        rows = ((0, self.tokenizer_size, False),)
        return rows + ((self.base_vocab_size, self.total_size, True),) if self.size else rows

    def mask_logits(self, logits: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        """`logits` (..., E + N) with forbidden ids set to the dtype's most negative finite value."""
        forbidden = self.forbidden_table(logits.device)[inside.long()]
        return logits.masked_fill(forbidden, torch.finfo(logits.dtype).min)

    # --- persistence ----------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "standard_token_ids": list(self.standard_token_ids),
            "multiplicities": list(self.multiplicities),
            "base_vocab_size": self.base_vocab_size,
            "tokenizer_size": self.tokenizer_size,
            "think_start_id": self.think_start_id,
            "think_end_id": self.think_end_id,
            "control_token_ids": list(self.control_token_ids),
        }

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKEN_MAP_FILE
        path.write_text(json.dumps(self.to_json()))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ReasoningVocab:
        path = Path(directory) / TOKEN_MAP_FILE
        try:
            data = json.loads(path.read_text())
            vocab = cls(
                base_vocab_size=int(data["base_vocab_size"]),
                tokenizer_size=int(data["tokenizer_size"]),
                think_start_id=int(data["think_start_id"]),
                think_end_id=int(data["think_end_id"]),
                standard_token_ids=tuple(int(i) for i in data["standard_token_ids"]),
                control_token_ids=tuple(int(i) for i in data["control_token_ids"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ReasoningVocabError(
                f"{path} is not a readable reasoning token map ({type(error).__name__}: {error}); copy it "
                "again from the checkpoint or run it came from."
            ) from error
        if list(vocab.multiplicities) != list(data.get("multiplicities", vocab.multiplicities)):
            raise ReasoningVocabError(
                f"{path}: multiplicities disagree with standard_token_ids; the file is corrupt: copy it "
                "again from the checkpoint or run it came from."
            )
        return vocab
