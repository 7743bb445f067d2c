"""The figures of the `analyze` entry point, drawn with matplotlib from the tables `job` writes.

Figures are built as `matplotlib.figure.Figure` objects and saved through the Agg canvas, never through
pyplot, so no display or global backend is involved and several figures can be drawn in one process. The
training run is always drawn in one colour and the baseline in another; a reasoning copy looks the same
(dashed, its multiplicity's marker) in every trajectory plot, and completion text uses `rlvr.rendering`'s
colours.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator, PercentFormatter

from rlvr.decoding import TokenSpan
from rlvr.rendering import colour_for, segments

ROLE_COLOURS = {"training": "#D55E00", "baseline": "#0072B2"}
ROLE_STYLES = {"training": "-", "baseline": "--"}
MATRIX_TITLES = {
    "tied": "input = output embeddings (tied)",
    "input": "input embeddings",
    "output": "output embeddings",
}
MEASURE_TITLES = {
    "twin": "distance from its standard twin's row",
    "start": "distance from its own row at the first checkpoint",
}
COPY_MARKERS = "^vsDP*X"  # multiplicity 1, 2, ...
FAMILY_COLUMNS = 4  # panels per row of the per-family figure
ENTROPY_TOKENS = 6  # input tokens drawn in the entropy figure: the most frequent inside thoughts
DPI = 150


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI)


def _steps_axis(axes) -> None:
    axes.set_xlabel("training step (checkpoint)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)


def _family_colours(families: Sequence[str]) -> dict[str, tuple]:
    palette = colormaps["tab10"]
    return {family: palette(i % 10) for i, family in enumerate(families)}


# --- usage --------------------------------------------------------------------------------------------------
def usage_share(usage: pd.DataFrame, logged: pd.DataFrame, path: Path) -> None:
    """Share of thought tokens that are reasoning ids per checkpoint (samples), with what training logged."""
    figure = Figure(figsize=(8, 4.8), layout="constrained")
    axes = figure.subplots()
    for (role, label), rows in usage.groupby(["run", "label"], sort=False):
        axes.plot(
            rows["step"],
            rows["reasoning_share"],
            color=ROLE_COLOURS[role],
            marker="o",
            linewidth=2,
            label=f"{label}: samples at checkpoints",
        )
    for (role, label), rows in logged.groupby(["run", "label"], sort=False):
        axes.plot(
            rows["step"],
            rows["reasoning_share"],
            color=ROLE_COLOURS[role],
            linestyle=":",
            marker=".",
            alpha=0.8,
            label=f"{label}: logged during training",
        )
    top = max(0.05, 1.15 * pd.concat([usage["reasoning_share"], logged["reasoning_share"]]).max())
    axes.set_ylim(-0.02 * top, top)  # a baseline's line at 0 stays visible above the frame
    axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.set_ylabel("reasoning ids / thought tokens")
    axes.set_title("Reasoning-vocabulary usage inside thoughts")
    _steps_axis(axes)
    figure.legend(loc="outside lower center", ncols=2, fontsize="small")
    _save(figure, path)


def usage_stacked(usage: pd.DataFrame, path: Path) -> None:
    """Thought tokens split into standard and reasoning ids, stacked shares over training, a panel per run."""
    runs = list(dict.fromkeys(usage["label"]))
    figure = Figure(figsize=(5.5 * len(runs) + 1.5, 4.4), layout="constrained")
    panels = figure.subplots(1, len(runs), squeeze=False, sharey=True)[0]
    for axes, label in zip(panels, runs, strict=True):
        rows = usage[usage["label"] == label]
        axes.stackplot(
            rows["step"],
            rows["standard_share"],
            rows["reasoning_share"],
            labels=["standard ids", "reasoning ids"],
            colors=["#BBBBBB", colour_for(1)],
            alpha=0.9,
        )
        axes.set_ylim(0, 1)
        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
        axes.set_title(label)
        _steps_axis(axes)
    panels[0].set_ylabel("share of thought tokens")
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles[::-1], labels[::-1], loc="outside right upper")
    figure.suptitle("Thought tokens: standard vs reasoning ids (sampled at each checkpoint)")
    _save(figure, path)


# --- drift --------------------------------------------------------------------------------------------------
def cosine_drift(drift: pd.DataFrame, path: Path) -> None:
    """Cosine distance of the reasoning rows over training: mean, 5-95% band and max over all N rows."""
    if drift.empty:
        figure = Figure(figsize=(7, 2), layout="constrained")
        axes = figure.subplots()
        axes.set_axis_off()
        axes.text(0.5, 0.5, "No reasoning rows: a baseline run (N = 0) has nothing to drift.",
                  transform=axes.transAxes, ha="center", va="center")  # fmt: skip
        _save(figure, path)
        return
    measures = [m for m in MEASURE_TITLES if m in set(drift["measure"])]
    figure = Figure(figsize=(6 * len(measures), 4.6), layout="constrained")
    panels = figure.subplots(1, len(measures), squeeze=False)[0]
    matrices = list(dict.fromkeys(drift["matrix"]))
    colours = {matrix: colormaps["Dark2"](i) for i, matrix in enumerate(matrices)}
    for axes, measure in zip(panels, measures, strict=True):
        for matrix in matrices:
            rows = drift[(drift["measure"] == measure) & (drift["matrix"] == matrix)].sort_values("step")
            colour, name = colours[matrix], MATRIX_TITLES[matrix]
            axes.fill_between(rows["step"], rows["p05"], rows["p95"], color=colour, alpha=0.2,
                              label=f"{name}: 5-95% of rows")  # fmt: skip
            axes.plot(rows["step"], rows["mean"], color=colour, marker="o", linewidth=2,
                      label=f"{name}: mean")  # fmt: skip
            axes.plot(rows["step"], rows["max"], color=colour, linestyle=":", label=f"{name}: max")
        axes.set_title(f"Reasoning row: {MEASURE_TITLES[measure]}", fontsize="medium")
        axes.set_ylabel("cosine distance (1 - cos)")
        axes.set_ylim(bottom=0)
        _steps_axis(axes)
    count, label = int(drift["rows"].iloc[0]), drift["label"].iloc[0]
    figure.suptitle(f"Drift of the reasoning rows over training (all {count:,} rows of {label})")
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(3, len(handles)), fontsize="small")
    _save(figure, path)


def _trajectories(axes, rows: pd.DataFrame, colours: dict[str, tuple]) -> None:
    """One line per (run, row) through the checkpoints; a large hollow marker at the first one."""
    for (role, _), unsorted in rows.groupby(["run", "token_id"], sort=False):
        line = unsorted.sort_values("step")
        multiplicity = int(line["multiplicity"].iloc[0])
        if role == "baseline":
            style = {"linestyle": ":", "marker": "x", "alpha": 0.7}
        elif multiplicity:
            style = {"linestyle": "--", "marker": COPY_MARKERS[(multiplicity - 1) % len(COPY_MARKERS)]}
        else:
            style = {"linestyle": "-", "marker": "o"}
        colour = colours[line["family"].iloc[0]]
        axes.plot(line["pc1"], line["pc2"], color=colour, markersize=4, linewidth=1.4, **style)
        axes.plot(
            line["pc1"].iloc[:1],
            line["pc2"].iloc[:1],
            color=colour,
            markersize=10,
            markerfacecolor="none",
            linestyle="none",
            marker=style["marker"],
            alpha=style.get("alpha", 1.0),
        )
    axes.grid(alpha=0.3)


def _style_legend(rows: pd.DataFrame) -> list[Line2D]:
    handles = [
        Line2D([], [], color="black", linestyle="-", marker="o", label="standard token (training run)")
    ]
    for multiplicity in sorted(set(rows["multiplicity"]) - {0}):
        marker = COPY_MARKERS[(multiplicity - 1) % len(COPY_MARKERS)]
        handles.append(
            Line2D(
                [],
                [],
                color="black",
                linestyle="--",
                marker=marker,
                label=f"reasoning copy, multiplicity {multiplicity}",
            )
        )
    if "baseline" in set(rows["run"]):
        handles.append(
            Line2D([], [], color="black", linestyle=":", marker="x", label="standard token (baseline run)")
        )
    handles.append(
        Line2D(
            [],
            [],
            color="black",
            linestyle="none",
            marker="o",
            markersize=10,
            markerfacecolor="none",
            label="first checkpoint",
        )
    )
    return handles


def _pc_labels(axes, rows: pd.DataFrame) -> None:
    for axis in (axes.xaxis, axes.yaxis):
        axis.set_major_locator(MaxNLocator(5))  # small panels: few ticks, so their labels never collide
    axes.set_xlabel(f"PC 1 ({rows['var_pc1'].iloc[0]:.0%} of variance)")
    axes.set_ylabel(f"PC 2 ({rows['var_pc2'].iloc[0]:.0%} of variance)")


def embedding_trajectories(pca: pd.DataFrame, path: Path) -> None:
    """All traced token families in one PCA plane per embedding matrix, trajectories over the checkpoints."""
    view = pca[pca["view"] == "all"]
    matrices = list(dict.fromkeys(view["matrix"]))
    colours = _family_colours(list(dict.fromkeys(view["family"])))
    figure = Figure(figsize=(max(8.0, 6.4 * len(matrices)), 6.4), layout="constrained")
    for axes, matrix in zip(figure.subplots(1, len(matrices), squeeze=False)[0], matrices, strict=True):
        rows = view[view["matrix"] == matrix]
        _trajectories(axes, rows, colours)
        _pc_labels(axes, rows)
        axes.set_title(MATRIX_TITLES[matrix], fontsize="medium")
    families = [Patch(color=colour, label=f"family {family}") for family, colour in colours.items()]
    figure.legend(
        handles=families + _style_legend(view), loc="outside lower center", ncols=4, fontsize="small"
    )
    figure.suptitle(
        "Token families in embedding space over training (PCA fitted on all rows shown)\n"
        "drift within a family is easier to see in embedding_pca_families.png",
        fontsize="medium",
    )
    _save(figure, path)


def family_trajectories(pca: pd.DataFrame, path: Path) -> None:
    """Each token family in its own PCA plane (fitted on that family's rows), where drift between a standard
    row and its copies is visible even when families lie far apart."""
    view = pca[pca["view"] == "family"]
    matrices = list(dict.fromkeys(view["matrix"]))
    families = list(dict.fromkeys(view["family"]))
    colours = _family_colours(families)
    panels = [(matrix, family) for matrix in matrices for family in families]
    columns = min(FAMILY_COLUMNS, len(panels))
    rows_of_panels = -(-len(panels) // columns)
    figure = Figure(figsize=(3.6 * columns + 3, 3.5 * rows_of_panels + 0.6), layout="constrained")
    grid = figure.subplots(rows_of_panels, columns, squeeze=False).flatten()
    for axes, (matrix, family) in zip(grid, panels, strict=False):
        rows = view[(view["matrix"] == matrix) & (view["family"] == family)]
        _trajectories(axes, rows, colours)
        _pc_labels(axes, rows)
        axes.set_title(f"{family}, {MATRIX_TITLES[matrix]}", fontsize="small")
    for axes in grid[len(panels) :]:
        axes.set_visible(False)
    figure.legend(handles=_style_legend(view), loc="outside right upper", fontsize="small")
    figure.suptitle("Each token family on its own (PCA fitted on the family's rows)")
    _save(figure, path)


# --- entropy ------------------------------------------------------------------------------------------------
def thought_entropy(totals: pd.DataFrame, by_token: pd.DataFrame, path: Path) -> None:
    """Mean entropy of the constrained next-token distribution inside thoughts over training: over all
    positions, and after each of the most frequent input tokens."""
    figure = Figure(figsize=(12, 4.8), layout="constrained")
    overall, per_token = figure.subplots(1, 2)
    for (role, label), rows in totals.groupby(["run", "label"], sort=False):
        overall.plot(
            rows["step"],
            rows["mean_entropy"],
            color=ROLE_COLOURS[role],
            linestyle=ROLE_STYLES[role],
            marker="o",
            linewidth=2,
            label=label,
        )
    overall.set_title("All positions inside thoughts", fontsize="medium")
    overall.set_ylabel("entropy (nats)")
    overall.legend(fontsize="small")
    _steps_axis(overall)
    first = by_token[(by_token["run"] == "training") & (by_token["step"] == by_token["step"].min())]
    top = first.nlargest(ENTROPY_TOKENS, "positions")["token_id"].tolist()
    colours = _family_colours([str(t) for t in top])
    for token_id in top:
        for role, rows in by_token[by_token["token_id"] == token_id].groupby("run", sort=False):
            per_token.plot(
                rows["step"],
                rows["mean_entropy"],
                color=colours[str(token_id)],
                linestyle=ROLE_STYLES[role],
                marker="o",
                markersize=4,
            )
    per_token.set_title(f"After each of the {len(top)} most frequent input tokens", fontsize="medium")
    per_token.set_ylabel("entropy (nats)")
    _steps_axis(per_token)
    labels = dict(zip(by_token["token_id"], by_token["token"], strict=True))
    handles = [Line2D([], [], color=colours[str(t)], label=f"after {labels[t]}") for t in top]
    handles += [
        Line2D([], [], color="black", linestyle=ROLE_STYLES[role], label=label)
        for (role, label) in totals[["run", "label"]].drop_duplicates().itertuples(index=False)
    ]
    figure.legend(handles=handles, loc="outside right upper", fontsize="small")
    figure.suptitle("Next-token entropy inside thoughts (constrained distribution, teacher-forced)")
    _save(figure, path)


# --- a completion -------------------------------------------------------------------------------------------
def _cells(text: str, spans: Sequence[TokenSpan], width: int) -> list[list[tuple[str, int]]]:
    """Lines of (character, multiplicity) wrapped at `width` columns (at a space when one is near the end)."""
    lines: list[list[tuple[str, int]]] = [[]]
    for run in segments(text, spans):
        for char in run.text.replace("\t", "    "):
            if char == "\n":
                lines.append([])
                continue
            line = lines[-1]
            if len(line) == width:
                cut = max(
                    (i for i, (c, _) in enumerate(line) if c == " " and i > width * 3 // 4), default=width - 1
                )
                lines[-1], rest = line[: cut + 1], line[cut + 1 :]
                lines.append(rest)
            lines[-1].append((char, run.multiplicity))
    return lines


def completion(
    text: str, spans: Sequence[TokenSpan], title: str, path: Path, width: int = 88, max_lines: int = 60
) -> None:
    """`text` in a monospaced font, each reasoning token on its multiplicity's colour, under a legend."""
    lines = _cells(text, spans, width)
    hidden = max(0, len(lines) - max_lines)
    lines = lines[:max_lines]
    font = {"family": "DejaVu Sans Mono", "size": 9}
    probe = Figure(dpi=DPI)
    FigureCanvasAgg(probe)
    sample = probe.text(0, 0, "M" * width, **font)
    # Inches per column of text.
    char_width = sample.get_window_extent(probe.canvas.get_renderer()).width / width / DPI
    line_height, header, footer, margin = 0.19, 0.85, 0.25, 0.3
    rows = len(lines) + (1 if hidden else 0)
    size = (width * char_width + 2 * margin, rows * line_height + header + footer)
    figure = Figure(figsize=size, dpi=DPI)
    axes = figure.add_axes(
        (margin / size[0], footer / size[1], width * char_width / size[0], rows * line_height / size[1])
    )
    axes.set_xlim(0, width)
    axes.set_ylim(rows, 0)
    axes.set_axis_off()
    for row, cells in enumerate(lines):
        column = 0
        for run in segments("".join(c for c, _ in cells), _spans_of(cells)):
            if run.multiplicity:
                axes.add_patch(
                    Rectangle(
                        (column, row + 0.05),
                        len(run.text),
                        0.9,
                        color=colour_for(run.multiplicity),
                        linewidth=0,
                    )
                )
            column += len(run.text)
        axes.text(
            0, row + 0.5, "".join(c for c, _ in cells), va="center", ha="left", parse_math=False, **font
        )
    if hidden:
        axes.text(
            0, rows - 0.5, f"... {hidden} more lines", va="center", color="grey", parse_math=False, **font
        )
    present = sorted({m for cells in lines for _, m in cells if m})
    legend = [Patch(facecolor="white", edgecolor="grey", label="standard token")]
    legend += [Patch(color=colour_for(m), label=f"reasoning copy, multiplicity {m}") for m in present]
    figure.legend(
        handles=legend,
        loc="upper left",
        bbox_to_anchor=(margin / size[0], 1 - 0.38 / size[1]),
        ncols=len(legend),
        fontsize="small",
        frameon=False,
    )
    shown = title if len(title) <= width else title[: width - 3] + "..."
    figure.text(
        margin / size[0], 1 - 0.12 / size[1], shown, va="top", ha="left", fontsize=10, parse_math=False
    )
    _save(figure, path)


def _spans_of(cells: Sequence[tuple[str, int]]) -> list[TokenSpan]:
    return [TokenSpan(i, i + 1, m) for i, (_, m) in enumerate(cells)]
