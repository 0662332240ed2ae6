"""The leaderboard's figures (matplotlib, Agg): the defense x attack heatmap with seen cells marked,
robustness curves per norm, and the worst case over nightly runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

NORM_ORDER = {"linf": 0, "l2": 1, "l1": 2, "spatial": 3, "none": 4}


def columns_of(data: Mapping[str, Any]) -> list[tuple[str, float, str]]:
    """Every (norm, eps, attack) column of a dataset, in threat-model order."""
    seen = {(c["norm"], c["eps"], c["attack"]) for d in data["defenses"] for c in d["cells"]}
    return sorted(seen, key=lambda c: (NORM_ORDER.get(c[0], 9), c[1], c[2]))


def heatmap(data: Mapping[str, Any], path: Path) -> Path:
    """Robust accuracy of every defense (rows, in rank order) under every attack x eps (columns);
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
    labels = [f"{a} {n} {e:g}" for n, e, a in columns]
    width = min(40.0, max(7.0, 0.22 * len(columns) + 3.5))
    height = 1.6 + 0.36 * len(defenses) + 0.065 * max((len(label) for label in labels), default=0)
    figure, axes = plt.subplots(figsize=(width, height), dpi=100)
    image = axes.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    for row, col in seen_cells:
        axes.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.4))
    axes.set_yticks(range(len(defenses)), [d["defense"] for d in defenses], fontsize=8)
    axes.set_xticks(range(len(columns)), labels, fontsize=6, rotation=90)
    axes.set_title(
        f"{data['dataset']}: robust accuracy per defense and attack (framed: seen threat model)", fontsize=10
    )
    figure.colorbar(image, ax=axes, fraction=0.02, pad=0.01, label="robust accuracy")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def curves(data: Mapping[str, Any], norm: str, path: Path) -> Path:
    """Best-known (worst-case) robust accuracy against eps, one line per defense."""
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for entry in data["defenses"]:
        points = sorted((t["eps"], t["value"]) for t in entry["worst_case_by_threat"] if t["norm"] == norm)
        if points:
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, marker="o", linewidth=1.4, markersize=3.5, label=entry["defense"])
    axes.set_xlabel(f"eps ({norm})")
    axes.set_ylabel("worst-case robust accuracy")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.set_title(f"{data['dataset']}: robustness curves, {norm}", fontsize=10)
    axes.legend(fontsize=6, loc="upper right", ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def worst_case_history(snapshots: Sequence[tuple[int, Mapping[str, Any]]], path: Path) -> Path:
    """Every defense's worst case (mean over threat models) across nightly runs."""
    series: dict[str, list[tuple[int, float]]] = {}
    labels = []
    for position, (run_id, snapshot) in enumerate(snapshots):
        labels.append(f"#{run_id}\n{snapshot['run']['started_at'][:10]}")
        for defense, worst in snapshot["worst_case"].items():
            series.setdefault(defense, []).append((position, worst["mean"]))
    figure, axes = plt.subplots(figsize=(max(6.0, 1.0 + 0.7 * len(labels)), 4.0), dpi=100)
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
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
