"""Tabular views of the report: the summary row of each defense, the wide CSV, and the Markdown."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
from tabulate import tabulate

from leaderboard.plots import columns_of

SUMMARY_COLUMNS = [
    "rank",
    "defense",
    "source",
    "clean",
    "worst case",
    "seen",
    "unseen",
    "gap",
    "rel. seen (avg)",
    "rel. unseen (avg)",
    "strongest attack",
    "flags",
    "training (s)",
]


def summary_rows(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "rank": d["rank"],
            "defense": d["defense"],
            "source": d["source"],
            "clean": d["clean"]["value"],
            "worst case": d["worst_case"],
            "seen": d["seen"],
            "unseen": d["unseen"],
            "gap": d["gap"],
            "rel. seen (avg)": d["relative_seen_avg"],
            "rel. unseen (avg)": d["relative_unseen_avg"],
            "strongest attack": d["strongest_attack"],
            "flags": ", ".join(f["key"] for f in d["flags"]),
            "training (s)": d["training"]["wall_time"],
        }
        for d in data["defenses"]
    ]


def wide_frame(data: Mapping[str, Any]) -> pd.DataFrame:
    """One row per defense: the summary, the worst case per threat model, and every attack x eps column."""
    rows = []
    for d, summary in zip(data["defenses"], summary_rows(data), strict=True):
        row = {"dataset": data["dataset"], "n_eval": data["n_eval"], **summary}
        row["training forwards"] = d["training"]["forwards"]
        row["training backwards"] = d["training"]["backwards"]
        for threat in d["worst_case_by_threat"]:
            row[f"worst {threat['norm']} {threat['eps']:g}"] = threat["value"]
        for cell in d["cells"]:
            row[f"{cell['attack']} {cell['norm']} {cell['eps']:g}"] = cell["robust_accuracy"]
        rows.append(row)
    return pd.DataFrame(rows)


def _table(frame: pd.DataFrame) -> str:
    cleaned = frame.astype(object).where(frame.notna(), None)  # missing values print as "–", not "nan"
    return tabulate(cleaned, headers="keys", tablefmt="github", showindex=False, floatfmt=".3f", missingval="–")


def markdown(data: Mapping[str, Any]) -> str:
    seeds = data["seeds"]
    lines = [
        f"## {data['dataset']}",
        "",
        f"{data['n_eval']} evaluation examples, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}. "
        "Accuracies are fractions. *worst case* is the best-known robust accuracy: per threat model, an example "
        "counts as robust only if every attack there (adaptive ones included) failed on it; the column is the mean "
        "over threat models and gives the rank. *seen* / *unseen*: mean robust accuracy on white-box cells inside a "
        "threat model the defense was trained for / on every other cell.",
        "",
        _table(pd.DataFrame(summary_rows(data), columns=SUMMARY_COLUMNS)),
        "",
        "### Worst case per threat model",
        "",
    ]
    threats = [(t["norm"], t["eps"]) for t in data["threat_models"]]
    worst = pd.DataFrame(
        [
            {"defense": d["defense"], **{f"{t['norm']} {t['eps']:g}": t["value"] for t in d["worst_case_by_threat"]}}
            for d in data["defenses"]
        ],
        columns=["defense", *(f"{n} {e:g}" for n, e in threats)],
    )
    lines += [_table(worst), ""]
    flagged = [d for d in data["defenses"] if d["flags"]]
    if flagged:
        lines += ["### Masking flags", ""]
        for d in flagged:
            for flag in d["flags"]:
                lines.append(f"- **{d['defense']}** — {flag['title']}: {flag['evidence']}")
        lines.append("")
    lines += ["### Robust accuracy per attack", ""]
    columns = columns_of(data)
    for norm, eps in threats:
        attacks = [a for n, e, a in columns if (n, e) == (norm, eps)]
        frame = pd.DataFrame(
            [
                {
                    "defense": d["defense"],
                    **{c["attack"]: c["robust_accuracy"] for c in d["cells"] if (c["norm"], c["eps"]) == (norm, eps)},
                }
                for d in data["defenses"]
            ],
            columns=["defense", *attacks],
        )
        lines += [f"**{norm} {eps:g}**", "", _table(frame), ""]
    for failure in data["failed_defenses"]:
        lines.append(f"- {failure['defense']} (seed {failure['seed']}): {failure['stage']} failed: {failure['error']}")
    if data["failed_cells"]:
        lines += ["", "Failed cells (not counted):"]
        lines += [
            f"- {c['defense']} × {c['attack']} @ {c['norm']} {c['eps']:g} (seed {c['seed']}): {c['error']}"
            for c in data["failed_cells"]
        ]
    return "\n".join(lines) + "\n"
