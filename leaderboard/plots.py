"""The leaderboard's figures (matplotlib, Agg): the defense x attack heatmap with seen cells marked,
robustness curves per norm, and the worst case over nightly runs.

Figures are made with matplotlib's object API (no pyplot: it is slow to import and keeps global
state) and laid out from the known label lengths instead of tight_layout, which draws every figure
twice — together more than half of the leaderboard's time on a default-sized matrix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from leaderboard.families import NORM_ORDER, Style

MISSING_GREY = colormaps["viridis"].with_extremes(bad="#d8dee4")
"""viridis, with cells a defense has no result for in light grey (white separates threat models)."""
CHAR_WIDTH = 0.62
"""Width of a label character in em (DejaVu Sans, generous for ids of letters, digits and hyphens)."""


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _text_inches(chars: int, fontsize: float) -> float:
    return chars * CHAR_WIDTH * fontsize / 72


def columns_of(data: Mapping[str, Any]) -> list[tuple[str, float, str]]:
    """Every (norm, eps, attack) column of a dataset, in threat-model order."""
    seen = {(c["norm"], c["eps"], c["attack"]) for d in data["defenses"] for c in d["cells"]}
    return sorted(seen, key=lambda c: (NORM_ORDER.get(c[0], 9), c[1], c[2]))


def heatmap(data: Mapping[str, Any], path: Path) -> Path:
    """Robust accuracy of every defense (rows, in rank order) under every attack x eps (columns,
    grouped by threat model: the group's norm and eps above it, white lines between groups);
    a black frame marks the cells the defense was trained for (seen)."""
    columns = columns_of(data)
    defenses = data["defenses"]
    grid = [[float("nan")] * len(columns) for _ in defenses]
    index = {c: i for i, c in enumerate(columns)}
    seen_cells = []
    for row, entry in enumerate(defenses):
        for cell in entry["cells"]:
            col = index[(cell["norm"], cell["eps"], cell["attack"])]
            grid[row][col] = cell["robust_accuracy"]
            if cell["seen"]:
                seen_cells.append((row, col))
    groups: list[tuple[str, int, int]] = []  # (threat model, first column, last column)
    for col, (norm, eps, _) in enumerate(columns):
        label = f"{norm} {eps:g}"
        if groups and groups[-1][0] == label:
            groups[-1] = (label, groups[-1][1], col)
        else:
            groups.append((label, col, col))
    labels = [attack for _, _, attack in columns]
    names = [d["defense"] for d in defenses]
    left = 0.25 + _text_inches(max((len(n) for n in names), default=0), 8)
    bottom = 0.2 + _text_inches(max((len(label) for label in labels), default=0), 6)
    title = f"{data['dataset']}: robust accuracy per defense and attack (framed: seen threat model)"
    plot_width = max(_text_inches(len(title), 10), min(36.0, 0.22 * len(columns)))
    plot_height = 0.36 * max(1, len(defenses))
    width, height = left + plot_width + 1.2, bottom + plot_height + 0.65
    figure = _figure(width, height)
    axes = figure.add_axes((left / width, bottom / height, plot_width / width, plot_height / height))
    image = axes.imshow(grid, aspect="auto", cmap=MISSING_GREY, vmin=0.0, vmax=1.0, interpolation="nearest")
    for row, col in seen_cells:
        axes.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.4))
    above = axes.get_xaxis_transform()  # x in columns, y in axes fractions
    for label, first, last in groups:
        if first:
            axes.axvline(first - 0.5, color="white", linewidth=2.0)
        axes.text((first + last) / 2, 1.01, label, transform=above, ha="center", va="bottom", fontsize=7)
    axes.set_yticks(range(len(defenses)), names, fontsize=8)
    axes.set_xticks(range(len(columns)), labels, fontsize=6, rotation=90)
    axes.set_title(title, fontsize=10, loc="left", pad=14)
    bar = figure.add_axes(((left + plot_width + 0.15) / width, bottom / height, 0.15 / width, plot_height / height))
    figure.colorbar(image, cax=bar, label="robust accuracy")
    figure.savefig(path)
    return path


MARKERS = {"circle": "o", "square": "s", "triangle": "^", "diamond": "D", "triangle-down": "v", "plus": "P"}
"""The page's marker names (families.py) in matplotlib's spelling; any other is an X."""


def _dashes(dash: str) -> Any:
    return "-" if not dash else (0, tuple(float(x) / 1.4 for x in dash.split()))


def curves(data: Mapping[str, Any], norm: str, path: Path, styles: Mapping[str, Style]) -> Path:
    """Best-known (worst-case) robust accuracy against eps, one line per defense, drawn in the page's
    style of that defense (colour-blind-safe colour, family marker and line style)."""
    figure = _figure(6.4, 4.2)
    axes = figure.add_axes((0.1, 0.12, 0.87, 0.8))
    for entry in data["defenses"]:
        points = sorted((t["eps"], t["value"]) for t in entry["worst_case_by_threat"] if t["norm"] == norm)
        if points:
            xs, ys = zip(*points, strict=True)
            style = styles[entry["defense"]]
            axes.plot(
                xs,
                ys,
                color=style.colour,
                marker=MARKERS.get(style.marker, "X"),
                markerfacecolor="white" if style.hollow else style.colour,
                linestyle=_dashes(style.dash),
                linewidth=1.4,
                markersize=4,
                label=entry["defense"],
            )
    axes.set_xlabel(f"eps ({norm})")
    axes.set_ylabel("worst-case robust accuracy")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.set_title(f"{data['dataset']}: robustness curves, {norm}", fontsize=10)
    axes.legend(fontsize=6, loc="upper right", ncol=2)
    figure.savefig(path)
    return path


def worst_case_history(snapshots: Sequence[tuple[int, Mapping[str, Any]]], path: Path) -> Path:
    """Every defense's worst case (mean over threat models) across nightly runs."""
    series: dict[str, list[tuple[int, float]]] = {}
    labels = []
    for position, (run_id, snapshot) in enumerate(snapshots):
        labels.append(f"#{run_id}\n{snapshot['run']['started_at'][:10]}")
        for defense, worst in snapshot["worst_case"].items():
            series.setdefault(defense, []).append((position, worst["mean"]))
    figure = _figure(max(6.0, 1.0 + 0.7 * len(labels)), 4.0)
    axes = figure.add_subplot()
    for defense, points in sorted(series.items()):
        xs, ys = zip(*points, strict=True)
        axes.plot(xs, ys, marker="o", label=defense)
    axes.set_xticks(range(len(labels)), labels, fontsize=8)
    axes.set_ylim(-0.02, 1.02)
    axes.set_ylabel("worst-case robust accuracy (mean)")
    axes.set_xlabel("nightly run")
    axes.set_title("Worst case per defense over nightly runs", fontsize=10)
    axes.grid(alpha=0.3)
    if series:
        axes.legend(fontsize=6, loc="best", ncol=2)
    figure.tight_layout()  # one small figure, and its x labels are two lines: worth the second draw
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
