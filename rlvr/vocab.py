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
# written into config.json with every save (the attributes `rlvr.surgery.attach` sets on the config), so an
# expanded directory is known as such even without its map
CONFIG_SIZE = "rlvr_reasoning_vocab_size"
CONFIG_BASE = "rlvr_base_vocab_size"
PAD_MULTIPLE = 128  # plain models round their embedding up to a multiple of this (or 1% more rows, below)
MAP_FIX = (
    "the map does not belong to this model: copy it again from the checkpoint or run the model came from"
)


class ReasoningVocabError(InputError):
    """A reasoning-vocabulary request that cannot be honoured; the message names the input and the fix."""


class TokenMapMismatch(ReasoningVocabError):
    """A token map that contradicts itself or the tokenizer it is checked against; `problem` starts with the
    field's name."""

    def __init__(self, problem: str):
        self.problem = problem
        super().__init__(
            f"the token map's {problem}; make maps with ReasoningVocab.for_tokenizer, or load them with "
            "rlvr.load_model."
        )


def thought_tag_ids(tokenizer: PreTrainedTokenizerBase) -> list[int | None]:
    """The ids of `<think>` and `</think>` in `tokenizer`, None for a tag that is no token of it."""
    unk = tokenizer.unk_token_id
    ids = tokenizer.convert_tokens_to_ids([THINK_START, THINK_END])
    return [None if i is None or (unk is not None and i == unk) else i for i in ids]


@dataclass(frozen=True)
class ReasoningVocab:
    """The token map of a model with `N = len(standard_token_ids)` reasoning rows appended after
    `base_vocab_size`.

    `tokenizer_size` is the number of real token ids; rows `tokenizer_size .. base_vocab_size - 1` are
    padding. `control_token_ids` are the tokenizer's added/special ids, whose reasoning copies are never
    sampled. `added_token_ids` are the thought tags the base model lacked and rlvr added
    (`rlvr.thought_tags`).
    """

    base_vocab_size: int
    tokenizer_size: int
    think_start_id: int
    think_end_id: int
    standard_token_ids: tuple[int, ...] = ()
    control_token_ids: tuple[int, ...] = ()
    added_token_ids: tuple[int, ...] = ()
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problem = self._inconsistency()
        if problem:
            raise TokenMapMismatch(problem)

    def _inconsistency(self) -> str | None:
        """What makes these fields contradict each other, whatever they are attached to (None: nothing)."""
        base, real = self.base_vocab_size, self.tokenizer_size
        if not 0 < real <= base:
            return f"tokenizer_size is {real}, which must be between 1 and base_vocab_size ({base})"
        tags = {"think_start_id": self.think_start_id, "think_end_id": self.think_end_id}
        for name, value in tags.items():
            if not 0 <= value < real:
                return f"{name} is {value}, not a token id (0..{real - 1})"
        if self.think_start_id == self.think_end_id:
            return f"think_start_id and think_end_id are both {self.think_end_id}"
        for name in ("standard_token_ids", "control_token_ids"):
            bad = [i for i in getattr(self, name) if not 0 <= i < real]
            if bad:
                return (
                    f"{name} holds {bad[:3]}, which are no token ids (0..{real - 1}; rows past are padding)"
                )
        if len(set(self.control_token_ids)) != len(self.control_token_ids):
            return "control_token_ids repeats ids"
        strays = sorted(set(self.added_token_ids) - set(tags.values()))
        if strays:
            return f"added_token_ids holds {strays[:3]}, which are not its thought tags"
        return None

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Refuse a map whose token ids are not this tokenizer's: the thought tags, the control ids whose
        copies are never sampled, and the count of real ids after which rows are padding."""
        size, tags, control = _tokenizer_facts(tokenizer)
        if self.tokenizer_size != size:
            raise TokenMapMismatch(
                f"tokenizer_size is {self.tokenizer_size}, but the tokenizer has {size} ids"
            )
        for name, mine, theirs, text in zip(
            ("think_start_id", "think_end_id"), (self.think_start_id, self.think_end_id), tags,
            (THINK_START, THINK_END), strict=True,
        ):  # fmt: skip
            if mine != theirs:
                raise TokenMapMismatch(f"{name} is {mine}, but the tokenizer's {text!r} is {theirs}")
        if tuple(sorted(self.control_token_ids)) != control:
            missing = sorted(set(control) - set(self.control_token_ids))
            extra = sorted(set(self.control_token_ids) - set(control))
            raise TokenMapMismatch(
                f"control_token_ids are not the tokenizer's special and added ids (missing {missing[:5]}, "
                f"not among them {extra[:5]})"
            )

    @classmethod
    def for_tokenizer(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        base_vocab_size: int,
        size: int,
        standard_token_ids: Sequence[int] | None = None,
        added_token_ids: Sequence[int] = (),
    ) -> ReasoningVocab:
        """Validate a request for `size` reasoning rows copied from `standard_token_ids` (default:
        0..size-1); `added_token_ids`: the thought tags rlvr added to the tokenizer (`rlvr.thought_tags`)."""
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
        _, think_ids, control = _tokenizer_facts(tokenizer)
        return cls(
            base_vocab_size=base_vocab_size,
            tokenizer_size=tokenizer_size,
            think_start_id=think_ids[0],
            think_end_id=think_ids[1],
            standard_token_ids=standard_token_ids,
            control_token_ids=control,
            added_token_ids=tuple(int(i) for i in added_token_ids),
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
            "added_token_ids": list(self.added_token_ids),
        }

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKEN_MAP_FILE
        path.write_text(json.dumps(self.to_json()))
        return path

    @classmethod
    def load(cls, directory: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> ReasoningVocab:
        """The map saved in `directory`, refused (one line naming the file, the field and the fix) when it
        contradicts itself or, given one, `tokenizer`."""
        path = Path(directory) / TOKEN_MAP_FILE
        try:
            data = json.loads(path.read_text())
            fields = {
                name: _whole(data[name])
                for name in ("base_vocab_size", "tokenizer_size", "think_start_id", "think_end_id")
            }
            ids = {
                name: tuple(_whole(i) for i in data[name])
                for name in ("standard_token_ids", "control_token_ids")
            }
            ids["added_token_ids"] = tuple(_whole(i) for i in data.get("added_token_ids", ()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ReasoningVocabError(
                f"{path} is not a readable reasoning token map ({type(error).__name__}: {error}); copy it "
                "again from the checkpoint or run it came from."
            ) from error
        try:
            vocab = cls(**fields, **ids)
            if "multiplicities" in data and list(data["multiplicities"]) != list(vocab.multiplicities):
                raise TokenMapMismatch("multiplicities disagree with standard_token_ids")
            if tokenizer is not None:
                vocab.check_tokenizer(tokenizer)
        except TokenMapMismatch as error:
            raise ReasoningVocabError(f"{path}: {error.problem}; {MAP_FIX}.") from error
        return vocab


def _whole(value) -> int:
    """A JSON integer (a float or bool there means the file was edited by hand or corrupted)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an integer")
    return value


def _tokenizer_facts(tokenizer: PreTrainedTokenizerBase) -> tuple[int, tuple[int, int], tuple[int, ...]]:
    """What a map records of its tokenizer: its size, its thought tags' ids, and its special and added ids."""
    think_ids = thought_tag_ids(tokenizer)
    if None in think_ids:
        raise ReasoningVocabError(
            f"the tokenizer has no single-token {THINK_START!r}/{THINK_END!r}, by which rlvr reads "
            "thoughts; add both as tokens (and resize the model) before training or evaluating it."
        )
    control = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return len(tokenizer), (think_ids[0], think_ids[1]), tuple(sorted(control))


def padded_rows(tokenizer_size: int, multiple: int | None = None) -> int:
    """The most embedding rows a plain model with `tokenizer_size` ids has: its ids rounded up to a multiple
    of `multiple` (a config's `pad_vocab_size_multiple`, else `PAD_MULTIPLE`), or 1% more, whichever is more.
    Qwen3: 151,669 ids, 151,936 rows; micro: 325 ids, 384 rows. More rows than this without a map mean an
    expanded model."""
    multiple = max(multiple or 0, PAD_MULTIPLE)
    return max(-(-tokenizer_size // multiple) * multiple, -(-tokenizer_size * 101 // 100))
