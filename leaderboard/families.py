"""Defense families and the drawing style of each defense, derived from the report alone.

A family is what a reader groups defenses by when asking whether robustness generalizes: the norms a
defense declares it was trained against (one norm, several, or none), or a masking flag, which puts
every number of that defense in doubt whatever it was trained for. Nothing here names a defense id:
a new defense or plugin gets a family and a style from its report entry.

Every figure draws a defense the same way: its family's marker and line style, and a colour of a
colour-blind-safe palette (Okabe & Ito, 2008, without its yellow, which is unreadable on white)
that is distinct within the family, so two defenses never share marker, line style and colour
while a family has at most as many members as the palette has colours (beyond that the marker is
drawn hollow, which doubles the count).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NORM_ORDER = {"linf": 0, "l2": 1, "l1": 2, "spatial": 3, "none": 4}
NORM_LABELS = {"linf": "Linf", "l2": "L2", "l1": "L1", "spatial": "spatial"}
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
"""Okabe-Ito: blue, vermillion, bluish green, reddish purple, orange, sky blue, black."""
MARKERS = ("circle", "square", "triangle", "diamond", "triangle-down", "plus", "cross")
DASHES = ("", "7 3", "2 2.5", "9 3 2 3", "4 4", "12 4", "1 3")
"""SVG stroke-dasharray per family, in user units (a line of width 1.6)."""
UNTRAINED = "untrained"
MULTI_NORM = "multi-norm"
FLAGGED = "flagged"


def norm_label(norm: str) -> str:
    return NORM_LABELS.get(norm, norm)


def _norm_key(norm: str) -> tuple[int, str]:
    return (NORM_ORDER.get(norm, 9), norm)


def trained_norms(entry: Mapping[str, Any]) -> list[str]:
    return sorted({str(t["norm"]) for t in entry["trained_against"]}, key=_norm_key)


def family_of(entry: Mapping[str, Any]) -> str:
    """``flagged`` for a defense with any masking flag; otherwise ``NORM-trained``, ``multi-norm`` or
    ``untrained`` (input transformations, distillation, the undefended model) from trained_against."""
    if entry["flags"]:
        return FLAGGED
    norms = trained_norms(entry)
    if not norms:
        return UNTRAINED
    return f"{norms[0]}-trained" if len(norms) == 1 else MULTI_NORM


def family_order(family: str) -> tuple[int, int, str]:
    """Single-norm families first (in norm order), then multi-norm, untrained, flagged."""
    if family.endswith("-trained"):
        norm = family[: -len("-trained")]
        return (0, *_norm_key(norm))
    return ({MULTI_NORM: 1, UNTRAINED: 2, FLAGGED: 3}.get(family, 4), 0, family)


def family_label(family: str) -> str:
    """``Linf-trained``, ``multi-norm``, ``untrained``, ``masking-flagged``."""
    if family.endswith("-trained"):
        return f"{norm_label(family[: -len('-trained')])}-trained"
    return "masking-flagged" if family == FLAGGED else family


@dataclass(frozen=True)
class Style:
    """How one defense is drawn in every figure."""

    family: str
    colour: str
    marker: str
    dash: str
    hollow: bool = False

    @property
    def family_label(self) -> str:
        return family_label(self.family)


def styles(defenses: Sequence[Mapping[str, Any]]) -> dict[str, Style]:
    """A style per defense id, for one section's defenses (in their report order, so by rank)."""
    families = {d["defense"]: family_of(d) for d in defenses}
    ordered = sorted(set(families.values()), key=family_order)
    out: dict[str, Style] = {}
    members: dict[str, int] = {}
    for d in defenses:
        family = families[d["defense"]]
        index = ordered.index(family)
        position = members.get(family, 0)
        members[family] = position + 1
        out[d["defense"]] = Style(
            family=family,
            colour=PALETTE[position % len(PALETTE)],
            marker=MARKERS[index % len(MARKERS)],
            dash=DASHES[index % len(DASHES)],
            hollow=(position // len(PALETTE)) % 2 == 1,
        )
    return out
