"""Completions rendered with their reasoning tokens marked, for tables, pages and figures people read.

Every renderer works from `segments`: the text cut into runs of one multiplicity (0 = standard tokens,
1 = first reasoning copies, 2 = second copies, ...), and colours a run by `colour_for(multiplicity)`, so a
token family looks the same in every format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rlvr.tokenizer import TokenSpan

SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
# Background colours for multiplicity 1, 2, 3, ...; colour-blind-safe (Okabe-Ito), cycling past 8.
MULTIPLICITY_COLOURS = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999")


def colour_for(multiplicity: int) -> str | None:
    """The colour of reasoning tokens of this multiplicity; None for standard tokens."""
    return MULTIPLICITY_COLOURS[(multiplicity - 1) % len(MULTIPLICITY_COLOURS)] if multiplicity else None


@dataclass(frozen=True)
class Segment:
    text: str
    multiplicity: int


def segments(text: str, spans: Sequence[TokenSpan]) -> list[Segment]:
    """`text` as maximal runs of characters that came from tokens of one multiplicity."""
    out: list[Segment] = []
    for span in spans:
        piece = text[span.start : span.end]
        if not piece:
            continue
        if out and out[-1].multiplicity == span.multiplicity:
            out[-1] = Segment(out[-1].text + piece, span.multiplicity)
        else:
            out.append(Segment(piece, span.multiplicity))
    return out


def marked_text(text: str, spans: Sequence[TokenSpan]) -> str:
    """Plain text with each reasoning run wrapped as ⟦...⟧, its multiplicity as a superscript past 1: ⟦ x⟧²."""
    parts = []
    for segment in segments(text, spans):
        if not segment.multiplicity:
            parts.append(segment.text)
            continue
        mark = "" if segment.multiplicity == 1 else str(segment.multiplicity).translate(SUPERSCRIPTS)
        parts.append(f"⟦{segment.text}⟧{mark}")
    return "".join(parts)
