"""The answer first: does robustness generalize? One figure and one sentence per dataset.

The figure is a dumbbell chart: per defense (rows, by rank), its worst case on the threat models it
was trained for (seen) and on the others (unseen) — the report's ``seen_worst_case`` and
``unseen_worst_case``, the same estimator on both sides — joined by a line whose length is the gap.
The sentence states the same thing as means over defense families, computed from the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from leaderboard import svg
from leaderboard.families import FLAGGED, UNTRAINED, Style, family_label, family_order, norm_label

SEEN_COLOUR = "#0072B2"
UNSEEN_COLOUR = "#D55E00"
"""Okabe-Ito blue and vermillion; seen is also filled and unseen hollow, so colour is never needed."""
LEFT, PLOT, RIGHT = 262, 380, 118
ROW, TOP, BOTTOM = 21, 34, 34
LABEL_CHARS = 31
"""Rank and name, cut to what fits between the family marker and the ⚠ at 12 px (the tooltip and the
summary give the whole id)."""


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values))


def _where(members: Sequence[Mapping[str, Any]], family: str) -> str:
    if family.endswith("-trained"):
        return norm_label(family[: -len("-trained")])
    return "their training threat models"


def _family_clause(family: str, members: Sequence[Mapping[str, Any]]) -> str | None:
    seen = [d["seen_worst_case"] for d in members if d["seen_worst_case"] is not None]
    unseen = [d["unseen_worst_case"] for d in members if d["unseen_worst_case"] is not None]
    label = family_label(family)
    count = len(members)
    subject = f"the {label} defense" if count == 1 else f"{label} defenses ({count})"
    keep = "keeps" if count == 1 else "keep"
    doubt = (
        f", and {'its' if count == 1 else 'their'} flags say even that may be overstated" if family == FLAGGED else ""
    )
    if seen and unseen:
        link = "but" if _mean(unseen) < _mean(seen) - 0.005 else "and"
        where = _where(members, family)
        return f"{subject} {keep} {_mean(seen):.2f} on {where} {link} {_mean(unseen):.2f} elsewhere{doubt}"
    if seen:
        return f"{subject} {keep} {_mean(seen):.2f} on {_where(members, family)}, every threat model here{doubt}"
    if unseen:
        trained = "" if family == UNTRAINED else ", trained for none of these threat models,"
        return f"{subject}{trained} {keep} {_mean(unseen):.2f}{doubt}"
    return None


def sentence(defenses: Sequence[Mapping[str, Any]], styles: Mapping[str, Style]) -> str:
    """One sentence from the data: per family, the mean worst case where its defenses were trained and
    elsewhere. Means are over ranked defenses (an incomplete one averages fewer threat models), or
    over all when none is ranked."""
    pool = [d for d in defenses if d["rank"] is not None] or list(defenses)
    if not pool:
        return "No defense has results here."
    by_family: dict[str, list[Mapping[str, Any]]] = {}
    for d in pool:
        by_family.setdefault(styles[d["defense"]].family, []).append(d)
    clauses = [
        clause
        for family in sorted(by_family, key=family_order)
        if (clause := _family_clause(family, by_family[family])) is not None
    ]
    text = "; ".join(clauses)
    if all(d["seen_worst_case"] is None for d in pool):
        best = max(pool, key=lambda d: d["unseen_worst_case"] or 0.0)
        text = (
            "No defense here was trained against any of these threat models, so nothing is seen and "
            f"generalization cannot be told apart from robustness: the best worst case is "
            f"{best['unseen_worst_case'] or 0.0:.2f} ({best['defense']}); " + text
        )
    return text[0].upper() + text[1:] + "."


def _x(value: float) -> float:
    return LEFT + PLOT * value


def _row(entry: Mapping[str, Any], style: Style, y: float, href: str) -> str:
    seen, unseen = entry["seen_worst_case"], entry["unseen_worst_case"]
    flagged = [f["key"] for f in entry["flags"]]
    rank = f"#{entry['rank']}" if entry["rank"] is not None else "–"
    what = f"{seen:.2f} seen → " if seen is not None else "trained for none of these: "
    what += f"{unseen:.2f} unseen" if unseen is not None else "no unseen threat model"
    if seen is not None and unseen is not None:
        what += f" (gap {seen - unseen:+.2f})"
    tooltip = f"{rank} {entry['defense']} ({style.family_label}): {what}"
    if entry["rank"] is None:
        tooltip += "; incomplete, not ranked"
    if flagged:
        tooltip += f"; flags: {', '.join(flagged)}"
    parts = [f'<g class="row{" flagged" if flagged else ""}{" unranked" if entry["rank"] is None else ""}">']
    parts.append(svg.title(tooltip))
    if flagged:
        parts.append(f'<rect class="band" x="0" y="{y - ROW / 2:g}" width="{LEFT + PLOT + RIGHT}" height="{ROW}"/>')
    parts.append(svg.marker(style, 10, y, 3.6))
    label = f"{rank} {entry['defense']}"
    if len(label) > LABEL_CHARS:
        label = label[: LABEL_CHARS - 1] + "…"
    parts.append(f'<a href="#{svg.text(href)}"><text class="name" x="20" y="{y + 4:g}">{svg.text(label)}</text></a>')
    if flagged:
        parts.append(f'<text class="warn" x="{LEFT - 8}" y="{y + 4:g}" text-anchor="end">⚠</text>')
    if seen is not None and unseen is not None:
        parts.append(f'<line class="gap" x1="{svg.num(_x(seen))}" y1="{y:g}" x2="{svg.num(_x(unseen))}" y2="{y:g}"/>')
    if seen is not None:
        parts.append(f'<circle class="seen" cx="{svg.num(_x(seen))}" cy="{y:g}" r="5"/>')
    if unseen is not None:
        parts.append(f'<circle class="unseen" cx="{svg.num(_x(unseen))}" cy="{y:g}" r="4.3"/>')
    value = f"{seen:.2f}" if seen is not None else "–"
    value += f" → {unseen:.2f}" if unseen is not None else " (all seen)"
    parts.append(f'<text class="value" x="{LEFT + PLOT + 12}" y="{y + 4:g}">{value}</text>')
    parts.append("</g>")
    return "".join(parts)


def dumbbell(defenses: Sequence[Mapping[str, Any]], styles: Mapping[str, Style], anchors: Mapping[str, str]) -> str:
    """The figure as an inline SVG: rows in report (rank) order, masked (flagged) defenses banded and
    marked ⚠, each row a link to the defense's detail and a tooltip with its numbers."""
    width = LEFT + PLOT + RIGHT
    height = TOP + ROW * max(1, len(defenses)) + BOTTOM
    axis_y = TOP + ROW * len(defenses)
    out = [
        f'<svg class="generalization" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        'aria-label="per defense: worst case where trained (seen) and elsewhere (unseen)">'
    ]
    out.append(
        '<g class="legend">'
        f'<circle class="seen" cx="{LEFT + 6}" cy="14" r="5"/>'
        f'<text x="{LEFT + 16}" y="18">worst case where trained (seen)</text>'
        f'<circle class="unseen" cx="{LEFT + 250}" cy="14" r="4.3"/>'
        f'<text x="{LEFT + 260}" y="18">elsewhere (unseen)</text></g>'
    )
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = svg.num(_x(tick))
        out.append(f'<line class="grid" x1="{x}" y1="{TOP - ROW / 2:g}" x2="{x}" y2="{axis_y:g}"/>')
        out.append(f'<text class="tick" x="{x}" y="{axis_y + 14:g}" text-anchor="middle">{tick:g}</text>')
    out.append(
        f'<text class="axis" x="{svg.num(_x(0.5))}" y="{axis_y + 29:g}" text-anchor="middle">'
        "worst-case robust accuracy (mean over threat models)</text>"
    )
    for i, entry in enumerate(defenses):
        y = TOP + ROW * i + ROW / 2 - 4
        out.append(_row(entry, styles[entry["defense"]], y, anchors[entry["defense"]]))
    out.append("</svg>")
    return "".join(out)


def legend(styles: Mapping[str, Style]) -> list[tuple[str, str]]:
    """(swatch SVG, family label) per family present, in legend order."""
    first: dict[str, Style] = {}
    for style in styles.values():
        first.setdefault(style.family, style)
    ordered = sorted(first, key=family_order)
    return [(svg.swatch(Style(f, "#57606a", first[f].marker, first[f].dash)), family_label(f)) for f in ordered]
