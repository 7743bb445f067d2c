"""Completions rendered with their reasoning tokens marked, for tables, pages and figures people read.

Every renderer works from `segments`: the text cut into runs of one multiplicity (0 = standard tokens,
1 = first reasoning copies, 2 = second copies, ...), and colours a run by `colour_for(multiplicity)`, so a
token family looks the same in every format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rlvr.decoding import TokenSpan

SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
# Background colours for multiplicity 1, 2, 3, ...; colour-blind-safe (Okabe-Ito), cycling past 8.
MULTIPLICITY_COLOURS = (
    "#E69F00",
    "#56B4E9",
    "#009E73",
    "#F0E442",
    "#0072B2",
    "#D55E00",
    "#CC79A7",
    "#999999",
)


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
    pieces: list[str] = []  # the run in hand, joined once it ends: linear in the text's length
    current = 0
    for span in spans:
        piece = text[span.start : span.end]
        if not piece:
            continue
        if pieces and span.multiplicity != current:
            out.append(Segment("".join(pieces), current))
            pieces = []
        pieces.append(piece)
        current = span.multiplicity
    if pieces:
        out.append(Segment("".join(pieces), current))
    return out


def marked_text(text: str, spans: Sequence[TokenSpan]) -> str:
    """Plain text with each reasoning run wrapped as ⟦...⟧, its multiplicity as a superscript past 1: ⟦
    x⟧²."""
    parts = []
    for segment in segments(text, spans):
        if not segment.multiplicity:
            parts.append(segment.text)
            continue
        mark = "" if segment.multiplicity == 1 else str(segment.multiplicity).translate(SUPERSCRIPTS)
        parts.append(f"⟦{segment.text}⟧{mark}")
    return "".join(parts)


# --- HTML pages ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PageEntry:
    """One completion on an HTML page, with what a reader needs to judge it."""

    heading: str
    prompt: str
    solution: str
    correct: bool
    text: str
    spans: Sequence[TokenSpan]


_PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
section { border: 1px solid #ccc; border-radius: 6px; margin: 1em 0; padding: 0.5em 1em; }
section.correct { border-left: 6px solid #009E73; }
section.wrong { border-left: 6px solid #D55E00; }
h2 { font-size: 1em; margin: 0.3em 0; }
.prompt, .solution { margin: 0.3em 0; white-space: pre-wrap; }
pre.completion { white-space: pre-wrap; word-break: break-word; background: #f7f7f7; padding: 0.5em; }
.reasoning, .swatch { border-radius: 2px; }
.swatch { padding: 0 0.4em; margin-right: 0.5em; }
"""


def html_completion(text: str, spans: Sequence[TokenSpan]) -> str:
    """`text` escaped for HTML, each reasoning run in a `<span class="reasoning">` coloured by its
    multiplicity."""
    from html import escape

    parts = []
    for segment in segments(text, spans):
        body = escape(segment.text)
        if segment.multiplicity:
            parts.append(
                f'<span class="reasoning" data-multiplicity="{segment.multiplicity}" '
                f'style="background:{colour_for(segment.multiplicity)}" '
                f'title="reasoning token, multiplicity {segment.multiplicity}">{body}</span>'
            )
        else:
            parts.append(body)
    return "".join(parts)


def _legend(entries: Sequence[PageEntry]) -> str:
    present = sorted({s.multiplicity for e in entries for s in e.spans if s.multiplicity and s.end > s.start})
    if not present:
        return '<p class="legend">No reasoning tokens in these completions.</p>'
    swatches = "".join(
        f'<span class="swatch" style="background:{colour_for(m)}">multiplicity {m}</span>' for m in present
    )
    return f'<p class="legend">Reasoning tokens, by multiplicity: {swatches}</p>'


def completions_page(title: str, entries: Sequence[PageEntry]) -> str:
    """One self-contained HTML page (inline CSS, no scripts, no external files) showing each completion with
    its prompt, solution and verdict, reasoning tokens coloured one colour per multiplicity as in every
    renderer."""
    from html import escape

    sections = [
        f'<section class="{"correct" if e.correct else "wrong"}">'
        f"<h2>{escape(e.heading)}: {'correct' if e.correct else 'wrong'}</h2>"
        f'<div class="prompt"><b>Prompt:</b> {escape(e.prompt)}</div>'
        f'<div class="solution"><b>Solution:</b> {escape(e.solution)}</div>'
        f'<pre class="completion">{html_completion(e.text, e.spans)}</pre></section>'
        for e in entries
    ]
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_PAGE_STYLE}</style></head>\n<body><h1>{escape(title)}</h1>{_legend(entries)}\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


# --- Markdown and LaTeX -------------------------------------------------------------------------------------
def _present(runs: Sequence[Segment]) -> list[int]:
    return sorted({run.multiplicity for run in runs if run.multiplicity})


def markdown_completion(text: str, spans: Sequence[TokenSpan]) -> str:
    """Markdown showing `text` verbatim, reasoning runs on their multiplicity's colour, under a legend.

    The body is an HTML `<pre>` block, which Markdown passes through untouched: the completion's spaces and
    line breaks survive and its `*`, `_` and `#` are not read as Markdown.
    """
    from html import escape

    runs = segments(text, spans)
    parts = []
    for run in runs:
        body = escape(run.text, quote=False)
        if run.multiplicity:
            body = (
                f'<span style="background-color:{colour_for(run.multiplicity)}" '
                f'title="reasoning token, multiplicity {run.multiplicity}">{body}</span>'
            )
        parts.append(body)
    swatches = " ".join(
        f'<span style="background-color:{colour_for(m)}">&nbsp;multiplicity {m}&nbsp;</span>'
        for m in _present(runs)
    )
    legend = f"Reasoning tokens, by multiplicity: {swatches}" if swatches else "No reasoning tokens."
    return f"{legend}\n\n<pre>{''.join(parts)}</pre>\n"


_LATEX_ESCAPES = str.maketrans(
    {
        "\\": r"\textbackslash{}",
        "{": r"\{",
        "}": r"\}",
        "$": r"\$",
        "&": r"\&",
        "#": r"\#",
        "%": r"\%",
        "_": r"\_",
        "^": r"\textasciicircum{}",
        "~": r"\textasciitilde{}",
        " ": r"\ ",
    }
)


def latex_completion(text: str, spans: Sequence[TokenSpan]) -> str:
    """A standalone LaTeX document (pdflatex, xcolor) showing `text` in typewriter type, reasoning runs in
    `\\colorbox`es of their multiplicity's colour; the body between `\\begin{document}` and `\\end{document}`
    can be pasted into a paper that loads xcolor and defines the same `rlvrcopyN` colours.

    Spaces become control spaces and line breaks `\\\\`, so the completion's layout survives; a box never
    spans a line break.
    """
    runs = segments(text, spans)
    lines: list[str] = [""]
    for run in runs:
        for index, piece in enumerate(run.text.split("\n")):
            if index:
                lines.append("")
            if piece:
                body = piece.translate(_LATEX_ESCAPES)
                lines[-1] += (
                    rf"\colorbox{{rlvrcopy{run.multiplicity}}}{{\strut {body}}}" if run.multiplicity else body
                )
    present = _present(runs)
    colours = "".join(rf"\definecolor{{rlvrcopy{m}}}{{HTML}}{{{colour_for(m)[1:]}}}" + "\n" for m in present)
    swatches = " ".join(rf"\colorbox{{rlvrcopy{m}}}{{\strut multiplicity {m}}}" for m in present)
    legend = f"Reasoning tokens, by multiplicity: {swatches}" if present else "No reasoning tokens."
    body = "\\\\\n".join(r"\leavevmode " + line for line in lines)
    return (
        "\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage[utf8]{inputenc}\n"
        "\\usepackage[margin=2cm]{geometry}\n\\usepackage{xcolor}\n"
        f"{colours}\\setlength{{\\fboxsep}}{{0.5pt}}\n\\begin{{document}}\n"
        f"\\noindent {legend}\\par\\medskip\n{{\\ttfamily\\noindent\n{body}\\par}}\n\\end{{document}}\n"
    )
