"""Completions rendered with their reasoning tokens marked, for tables and pages people read."""

from __future__ import annotations

from typing import Sequence

from rlvr.tokenizer import TokenSpan

SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def marked_text(text: str, spans: Sequence[TokenSpan]) -> str:
    """`text` with each run of reasoning tokens of one multiplicity wrapped as ⟦...⟧, e.g. ⟦ x⟧ or ⟦ x⟧²."""
    out, position, index = [], 0, 0
    while index < len(spans):
        span = spans[index]
        if not span.multiplicity:
            index += 1
            continue
        end = index
        while end + 1 < len(spans) and spans[end + 1].multiplicity == span.multiplicity:
            end += 1
        out.append(text[position : span.start])
        mark = "" if span.multiplicity == 1 else str(span.multiplicity).translate(SUPERSCRIPTS)
        out.append(f"⟦{text[span.start : spans[end].end]}⟧{mark}")
        position = spans[end].end
        index = end + 1
    out.append(text[position:])
    return "".join(out)
