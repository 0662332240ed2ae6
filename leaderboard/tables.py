"""Tabular views of the report: the summary row of each defense, the wide CSV, and the Markdown."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
    "wc seen",
    "wc unseen",
    "gap",
    "ratio",
    "rel. seen (avg)",
    "rel. seen (worst)",
    "rel. unseen (avg)",
    "rel. unseen (worst)",
    "strongest attack",
    "flags",
    "training (s)",
]
INCOMPLETE = "(incomplete)"
"""Appended to the name of a defense that is not ranked because it has no result at some threat model."""


def threat_list(threats: list[Mapping[str, Any]]) -> str:
    return ", ".join(f"{t['norm']} {t['eps']:g}" for t in threats)


def summary_rows(data: Mapping[str, Any], *, mark_incomplete: bool = False) -> list[dict[str, Any]]:
    return [
        {
            "rank": d["rank"],
            "defense": f"{d['defense']} {INCOMPLETE}"
            if mark_incomplete and (d["missing_threat_models"] or d["failed_attacks"])
            else d["defense"],
            "source": d["source"],
            "clean": d["clean"]["value"],
            "worst case": d["worst_case"],
            "seen": d["seen"],
            "unseen": d["unseen"],
            "wc seen": d["seen_worst_case"],
            "wc unseen": d["unseen_worst_case"],
            "gap": d["gap"],
            "ratio": d["ratio"],
            "rel. seen (avg)": d["relative_seen_avg"],
            "rel. seen (worst)": d["relative_seen_worst"],
            "rel. unseen (avg)": d["relative_unseen_avg"],
            "rel. unseen (worst)": d["relative_unseen_worst"],
            "strongest attack": d["strongest_attack"],
            "flags": ", ".join(f["key"] for f in d["flags"]),
            "training (s)": d["training"]["wall_time"],
        }
        for d in data["defenses"]
    ]


def wide_rows(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per defense: the summary, the worst case per threat model, and every attack x eps column."""
    rows = []
    for d, summary in zip(data["defenses"], summary_rows(data), strict=True):
        row = {"dataset": data["dataset"], "n_eval": data["n_eval"], **summary}
        row["missing threat models"] = threat_list(d["missing_threat_models"])
        row["training forwards"] = d["training"]["forwards"]
        row["training backwards"] = d["training"]["backwards"]
        for threat in d["worst_case_by_threat"]:
            row[f"worst {threat['norm']} {threat['eps']:g}"] = threat["value"]
        for cell in d["cells"]:
            row[f"{cell['attack']} {cell['norm']} {cell['eps']:g}"] = cell["robust_accuracy"]
        rows.append(row)
    return rows


CSV_DECIMALS = 4
"""Fractions of at most a few thousand examples: a fifth decimal is below one example, and binary
noise (0.38200000000000006) is no information."""


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What a spreadsheet reads as the start of a formula: a text cell starting so gets a leading quote."""


def csv_safe(value: Any) -> Any:
    """``value``, with a text that a spreadsheet would run as a formula (CSV injection) made plain text
    by a leading single quote; numbers stay numbers. A plugin's source is free text."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def _rounded(row: Mapping[str, Any]) -> dict[str, Any]:
    return {csv_safe(k): round(v, CSV_DECIMALS) if isinstance(v, float) else csv_safe(v) for k, v in row.items()}


def write_csv(datasets: list[Mapping[str, Any]], path: Path) -> None:
    """Every section's wide rows in one CSV (pandas: quoting, numbers as numbers, rounded to
    ``CSV_DECIMALS``); a column a row lacks is an empty field. Imported here, not at the top: only
    this writer needs it."""
    import pandas as pd

    rows = [_rounded(row) for data in datasets for row in wide_rows(data)]
    columns = list(dict.fromkeys(column for row in rows for column in row))
    frame = pd.DataFrame(rows, columns=columns, dtype=object)  # object: an int column with gaps stays ints
    frame.to_csv(path, index=False, lineterminator="\n")


def markdown_cell(value: Any) -> Any:
    """``value`` fit for one cell of a Markdown table: a text's backslashes and ``|`` escaped and its
    line breaks made spaces, so a plugin's free-text source or an error message cannot split or end
    the table (GitHub splits a row at every ``|`` that no backslash escapes)."""
    if not isinstance(value, str):
        return value
    return " ".join(value.replace("\\", "\\\\").replace("|", "\\|").splitlines())


def _table(rows: list[Mapping[str, Any]], columns: list[str]) -> str:
    """A GitHub Markdown table; missing values print as "–"."""
    body = [[markdown_cell(row.get(column)) for column in columns] for row in rows]
    headers = [markdown_cell(column) for column in columns]
    return tabulate(body, headers=headers, tablefmt="github", floatfmt=".3f", missingval="–")


REFERENCE_COLUMNS = ["defense", "threat model", "reference", "AutoAttack", "worst case", "only AutoAttack"]


def reference_rows(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per defense and threat model with a reference evaluation: it beside the worst case."""
    return [
        {
            "defense": d["defense"],
            "threat model": f"{t['norm']} {t['eps']:g}",
            "reference": t["reference"]["attack"],
            "AutoAttack": t["reference"]["value"],
            "worst case": t["value"],
            "only AutoAttack": t["reference"]["beyond"],
        }
        for d in data["defenses"]
        for t in d["worst_case_by_threat"]
        if t.get("reference")
    ]


def bracket_rows(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per defense and threat model with a certificate: [certified, worst case] with both intervals,
    the gap still unknown, and each verifier's result (or why it could not run) and time."""
    rows = []
    for d in data["defenses"]:
        for t in d["worst_case_by_threat"]:
            c = t.get("certified")
            if c is None:
                continue
            runs = "; ".join(
                f"{r['verifier']} {r['value']:.3f} ({r['wall_time']:.1f} s)"
                if r["status"] == "ok"
                else f"{r['verifier']}: {r['status']} ({r['reason']})"
                for r in c["verifiers"]
            )
            rows.append(
                {
                    "defense": d["defense"],
                    "threat model": f"{t['norm']} {t['eps']:g}",
                    "[certified, worst case]": f"[{c['value']:.3f}, {t['value']:.3f}]",
                    "certified 95% CI": f"{c['low']:.3f}–{c['high']:.3f}",
                    "worst case 95% CI": f"{t['low']:.3f}–{t['high']:.3f}",
                    "unknown": round(t["value"] - c["value"], 4),
                    "verifiers": runs,
                }
            )
    return rows


def markdown(data: Mapping[str, Any]) -> str:
    seeds = data["seeds"]
    lines = [
        f"## {data['dataset']}" + (f" ({data['n_eval']} evaluation examples)" if data["warnings"] else ""),
        "",
        *(f"> **Warning:** {text}\n" for text in data["warnings"]),
        f"{data['n_eval']} evaluation examples, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}. "
        "Accuracies are fractions. *worst case* is the best-known robust accuracy: per threat model, an example "
        "counts as robust only if every attack there (adaptive ones included) failed on it; the column is the mean "
        "over the dataset's threat models and gives the rank. *seen* / *unseen*: mean robust accuracy on white-box "
        "cells inside a threat model the defense was trained for / on every other cell (different attack mixes: "
        "not comparable). *wc seen* / *wc unseen*: mean worst case over the seen / unseen threat models; "
        "*gap* = wc seen − wc unseen and *ratio* = wc unseen / wc seen. *rel.*: competitive ratio (accuracy / "
        "the best defense's) on the worst case per threat model, average and worst over seen / unseen ones.",
        "",
        _table(summary_rows(data, mark_incomplete=True), SUMMARY_COLUMNS),
        "",
    ]
    incomplete = [d for d in data["defenses"] if d["missing_threat_models"] or d["failed_attacks"]]
    for d in incomplete:
        if not d["missing_threat_models"]:
            failed = ", ".join(f"{f['attack']} at {f['norm']} {f['eps']:g}" for f in d["failed_attacks"])
            lines.append(
                f"- **{d['defense']} {INCOMPLETE}** is not ranked: cells failed ({failed}), so its worst case is "
                "over fewer attacks than everyone else's. Fix the attack and `run --retry-failed`, or drop it "
                "from the matrix."
            )
            continue
        lines.append(
            f"- **{d['defense']} {INCOMPLETE}** is not ranked: it has no result at "
            f"{threat_list(d['missing_threat_models'])} (its cells there failed or were not run), so its worst "
            "case would be a mean over fewer threat models than everyone else's."
        )
    if incomplete:
        lines.append("")
    lines += [
        "### Worst case per threat model",
        "",
    ]
    threats = [(t["norm"], t["eps"]) for t in data["threat_models"]]
    worst = [
        {"defense": d["defense"], **{f"{t['norm']} {t['eps']:g}": t["value"] for t in d["worst_case_by_threat"]}}
        for d in data["defenses"]
    ]
    lines += [_table(worst, ["defense", *(f"{n} {e:g}" for n, e in threats)]), ""]
    bracket = bracket_rows(data)
    if bracket:
        lines += [
            "### Certified lower bound beside the worst case",
            "",
            "*certified*: the share of evaluation examples some verifier proved robust (no input in the ball ∩ "
            "[0, 1] changes the prediction); *worst case*: the share no attack broke. The truth lies in between; "
            "*unknown* is the gap. See docs/certified.md.",
            "",
            _table(bracket, list(bracket[0])),
            "",
        ]
    checked = reference_rows(data)
    if checked:
        lines += [
            "### Against the reference evaluation",
            "",
            'AutoAttack (the reference code, `version="standard"`) on the same checkpoints and examples, kept out '
            "of the worst case. *only AutoAttack* counts examples it broke that every attack of the matrix missed.",
            "",
            _table(checked, REFERENCE_COLUMNS),
            "",
        ]
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
        frame = [
            {
                "defense": d["defense"],
                **{c["attack"]: c["robust_accuracy"] for c in d["cells"] if (c["norm"], c["eps"]) == (norm, eps)},
            }
            for d in data["defenses"]
        ]
        lines += [f"**{norm} {eps:g}**", "", _table(frame, ["defense", *attacks]), ""]
    for failure in data["failed_defenses"]:
        lines.append(f"- {failure['defense']} (seed {failure['seed']}): {failure['stage']} failed: {failure['error']}")
    if data["failed_cells"]:
        lines += ["", "Failed cells (not counted):"]
        lines += [
            f"- {c['defense']} × {c['attack']} @ {c['norm']} {c['eps']:g} (seed {c['seed']}): {c['error']}"
            for c in data["failed_cells"]
        ]
    return "\n".join(lines) + "\n"
