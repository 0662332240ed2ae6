"""``index.html``: the report rendered as one self-contained page.

Everything the page shows is computed here from the validated report (never from the database);
the template only lays it out. Strings reach the page through Jinja2's autoescape, and through
``svg.text`` inside the figures drawn in Python; anchors are built from sanitized ids."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from leaderboard import answer, curves, matrix, svg
from leaderboard.families import styles as family_styles
from leaderboard.flags import FLAGS
from leaderboard.tables import threat_list

TEMPLATES = Path(__file__).parent / "templates"
FLAG_BADGES = {
    "single-step-beats-iterative": "1-step",
    "black-box-beats-white-box": "black-box",
    "accuracy-rises-with-eps": "eps-rise",
    "not-near-chance": "not-chance",
    "standard-evaluation-unreliable": "adaptive",
    "zero-gradients": "0-grad",
    "probability-outputs": "probs",
    "undeclared-randomness": "random",
    "clean-near-chance": "collapsed",
}
"""The compact badge of each flag in the summary (its key, title and evidence are in its tooltip)."""


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _passes(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def _sort_value(value: float | None) -> str:
    """The ``data-v`` a sortable cell carries: the full number, or empty for a missing one."""
    return "" if value is None else repr(float(value))


def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    env.filters.update(
        pct=_pct, ratio=_ratio, passes=_passes, threats=threat_list, v=_sort_value, short_attack=matrix.short_attack
    )
    return env


def anchors(defenses: Sequence[Mapping[str, Any]], key: str) -> dict[str, str]:
    """A unique, HTML-id-safe anchor per defense: section key, position and the id's safe characters."""
    out = {}
    for i, d in enumerate(defenses, start=1):
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", d["defense"]).strip("-")[:48]
        out[d["defense"]] = f"d-{key}-{i}" + (f"-{slug}" if slug else "")
    return out


def broken_by(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The attacks that broke a defense: each attack that was the strongest single attack at some
    threat model, with those threat models and the lowest worst case among them (most first)."""
    by_attack: dict[str, list[Mapping[str, Any]]] = {}
    for threat in entry["worst_case_by_threat"]:
        by_attack.setdefault(threat["strongest_attack"], []).append(threat)
    rows = [
        {
            "attack": attack,
            "threats": threat_list(threats),
            "lowest": min(t["value"] for t in threats),
            "decisive": attack == entry["strongest_attack"],
        }
        for attack, threats in by_attack.items()
    ]
    return sorted(rows, key=lambda r: (not r["decisive"], -len(r["threats"]), r["lowest"], r["attack"]))


def _filter_text(entry: Mapping[str, Any], family: str) -> str:
    """What the filter box matches a row on: id, source, family and flags."""
    return " ".join([entry["defense"], entry["source"], family, *(f["key"] for f in entry["flags"])]).lower()


def section(data: Mapping[str, Any], key: str, heatmap: str) -> dict[str, Any]:
    """Everything one dataset's section of the page shows, besides the report itself; ``heatmap`` is
    the file name of its PNG matrix beside the page."""
    defenses = data["defenses"]
    styles = family_styles(defenses)
    links = anchors(defenses, key)
    norms = curves.norms_of(data)
    groups = matrix.groups_of(data)
    flags_here = sorted({f["key"] for d in defenses for f in d["flags"]}, key=list(FLAGS).index)
    return {
        "key": key,
        "styles": styles,
        "anchors": links,
        "swatches": {name: Markup(svg.swatch(style)) for name, style in styles.items()},
        "filter": {d["defense"]: _filter_text(d, styles[d["defense"]].family_label) for d in defenses},
        "sentence": answer.sentence(defenses, styles),
        "dumbbell": Markup(answer.dumbbell(defenses, styles, links)),
        "families": [(Markup(swatch), label) for swatch, label in answer.legend(styles)],
        "curves": [Markup(curves.panel(defenses, styles, norm, data["dataset"])) for norm in norms],
        "detail_curves": {
            d["defense"]: [
                Markup(curves.panel(defenses, styles, norm, data["dataset"], highlight=d["defense"]))
                for norm in norms
                if any(t["norm"] == norm for t in d["worst_case_by_threat"])
            ]
            for d in defenses
        },
        "broken_by": {d["defense"]: broken_by(d) for d in defenses},
        "groups": groups,
        "collapse": matrix.collapse(groups),
        "heatmap": heatmap,
        "rows": matrix.rows_of(data, groups),
        "flags": [(FLAG_BADGES.get(k, k), k, FLAGS[k]) for k in flags_here],
    }


def render(report: Mapping[str, Any], keys: Sequence[str], heatmaps: Sequence[str], history_png: str | None) -> str:
    """The page's HTML: a section per dataset (``keys`` and ``heatmaps``, the PNG files' names, in the
    report's order); ``history_png`` is the nightly-history PNG in base64, when there is one."""
    views = [section(data, key, heatmap) for data, key, heatmap in zip(report["datasets"], keys, heatmaps, strict=True)]
    template = environment().get_template("index.html.j2")
    return template.render(
        report=report,
        views=views,
        badges=FLAG_BADGES,
        matrix_css=Markup(matrix.colour_css()),
        history=history_png,
    )
