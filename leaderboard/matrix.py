"""The defense x attack matrix as an HTML table: what the template needs, cell by cell.

Columns are grouped by threat model (norm, eps); each group opens with the defense's worst case
there, so a collapsed group (the page's script collapses them; without scripts every column shows)
still answers the question for that threat model. A cell's background comes from its value on a
stepped viridis scale (CSS classes, not inline styles: the default matrix has ~1,100 cells), its
tooltip gives the value and 95% Wilson interval, and seen cells are framed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from matplotlib import colormaps

from leaderboard.families import NORM_ORDER

STEPS = 20
"""Colour steps of 5 points: finer than the eye tells apart in a table, coarser than the noise."""
COLLAPSE_ABOVE = 36
"""With more attack columns than this (about what a 1280 px window holds), the page's script starts
with every group collapsed to its worst case; a click on a threat model opens it."""


def _hex(rgba: tuple[float, ...]) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgba[:3])


def _luminance(rgba: tuple[float, ...]) -> float:
    return 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]


def colour_css() -> str:
    """One CSS rule per step: background from viridis at the step's centre, text white on dark ones."""
    cmap = colormaps["viridis"]
    rules = []
    for step in range(STEPS):
        rgba = cmap((step + 0.5) / STEPS)
        text = "#fff" if _luminance(rgba) < 0.45 else "#111"
        rules.append(f".matrix td.c{step},.scale .c{step}{{background:{_hex(rgba)};color:{text}}}")
    return "\n".join(rules)


def step_of(value: float) -> int:
    return min(STEPS - 1, max(0, int(value * STEPS)))


@dataclass(frozen=True)
class Cell:
    text: str
    css: str
    title: str
    seen: bool


MISSING = Cell("–", "missing", "no result", False)


@dataclass
class Group:
    index: int
    norm: str
    eps: float
    attacks: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.norm} {self.eps:g}"


def short_attack(attack: str, norm: str) -> str:
    """The column header: the attack id without its norm, which the group header already gives
    (apgd-ce-linf-v1 under "linf 0.2" reads apgd-ce-v1); the tooltip keeps the full id."""
    return attack.replace(f"-{norm}-", "-", 1)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def collapse(groups: list[Group]) -> bool:
    return sum(len(g.attacks) for g in groups) > COLLAPSE_ABOVE


def groups_of(data: Mapping[str, Any]) -> list[Group]:
    columns = sorted(
        {(c["norm"], c["eps"], c["attack"]) for d in data["defenses"] for c in d["cells"]},
        key=lambda c: (NORM_ORDER.get(c[0], 9), c[0], c[1], c[2]),
    )
    threats = sorted(
        {(t["norm"], t["eps"]) for t in data["threat_models"]}, key=lambda t: (NORM_ORDER.get(t[0], 9), t[0], t[1])
    )
    groups = {threat: Group(i, *threat) for i, threat in enumerate(threats)}
    for norm, eps, attack in columns:
        groups[(norm, eps)].attacks.append(attack)
    return list(groups.values())


def rows_of(data: Mapping[str, Any], groups: list[Group]) -> list[dict[str, Any]]:
    """Per defense (rank order): per group, its worst-case cell and one cell per attack column."""
    rows = []
    for d in data["defenses"]:
        name = d["defense"]
        cells = {(c["norm"], c["eps"], c["attack"]): c for c in d["cells"]}
        worst = {(t["norm"], t["eps"]): t for t in d["worst_case_by_threat"]}
        row_groups = []
        for group in groups:
            threat = worst.get((group.norm, group.eps))
            if threat is None:
                head = Cell("–", "missing", f"{name}: no result at {group.label} (incomplete)", False)
            else:
                head = Cell(
                    f"{100 * threat['value']:.0f}",
                    f"c{step_of(threat['value'])} worst",
                    f"{name}: worst case at {group.label} over {threat['attacks']} attacks: "
                    f"{_percent(threat['value'])} (95% CI {_percent(threat['low'])}–{_percent(threat['high'])}); "
                    f"strongest {threat['strongest_attack']}" + ("; seen (trained for)" if threat["seen"] else ""),
                    threat["seen"],
                )
            attack_cells = []
            for attack in group.attacks:
                cell = cells.get((group.norm, group.eps, attack))
                if cell is None:
                    attack_cells.append(MISSING)
                    continue
                attack_cells.append(
                    Cell(
                        f"{100 * cell['robust_accuracy']:.0f}",
                        f"c{step_of(cell['robust_accuracy'])}",
                        f"{name} × {attack} at {group.label}: {_percent(cell['robust_accuracy'])} "
                        f"(95% CI {_percent(cell['ci_low'])}–{_percent(cell['ci_high'])}, n = {cell['n']})"
                        + ("; seen (trained for)" if cell["seen"] else ""),
                        cell["seen"],
                    )
                )
            row_groups.append({"worst": head, "cells": attack_cells})
        rows.append({"entry": d, "groups": row_groups})
    return rows
