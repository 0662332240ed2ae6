"""``robustmatrix nightly``: run (or complete) the matrix for the current code, then say what changed
since the previous nightly run in the same database.

Each nightly run keeps a snapshot (table ``nightly``): every cell it covered with its robust
accuracy, each defense's per-example worst case, the masking flags, each attack's wall time per
attacked example. Two snapshots are compared:

- a cell (same defense, attack, threat model, seed, evaluation size) whose robust accuracy left the
  Wilson 95% confidence interval of its previous value — either way: the attack or the defense
  changed, and someone should look;
- a defense whose worst case at some threat model left its interval;
- masking flags that appeared (a regression) or cleared (news);
- defenses or attacks that were removed (a regression) or added (news);
- cells the previous run covered that this run no longer does although their defense and attack are
  still in the matrix (a pairing changed: an adaptive attack that stopped applying hides robustness
  problems, so this is a regression);
- attacks whose cells were re-run this time and became slower per example than ``max_slowdown``
  times before (timed over the re-run cells only, when those took at least ``MIN_TIMED_SECONDS``);
- failures (cells, trainings, evaluations) of this run.

The report is written as ``regressions.md`` and ``regressions.json``; the leaderboard written beside
it plots every defense's worst case over all nightly runs (``nightly-history.png``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.execution.runner import RunSummary
from bench.foundation.errors import RobustMatrixError
from bench.storage.store import Store
from leaderboard.metrics import wilson_interval

HISTORY_PLOT = "nightly-history.png"
"""Drawn by the leaderboard (``leaderboard.build``), which ``nightly`` writes into the same folder."""
REPORT_MD = "regressions.md"
REPORT_JSON = "regressions.json"
DEFAULT_MAX_SLOWDOWN = 1.5
MIN_TIMED_SECONDS = 1.0
"""An attack whose re-run cells took less than this in total is not flagged as slower: at that
scale wall time measures the machine's load, not the attack."""


def outside(before: float, after: float, n: int) -> tuple[bool, tuple[float, float]]:
    """Whether ``after`` lies outside the 95% interval of ``before`` measured on ``n`` examples."""
    low, high = wilson_interval(round(before * n), n)
    return not (low - 1e-12 <= after <= high + 1e-12), (low, high)


def require_previous(db_path: str | Path, baseline: bool) -> None:
    """Refuse a nightly run with nothing to compare against unless ``--baseline`` says it is the
    first: a database lost between nights (an evicted CI cache) would otherwise make every night a
    silent new baseline that reports no change. Checked before the matrix runs, not after hours."""
    if baseline:
        return
    path = Path(db_path)
    previous = 0
    if path.is_file() and path.stat().st_size > 0:
        with Store.open_existing(path) as store:
            previous = len(store.nightly_snapshots())
    if not previous:
        raise RobustMatrixError(
            f"no previous nightly run in {path} to compare with; pass --baseline if this is the first "
            "night of this database (was it lost since the last night?)"
        )


# ------------------------------------------------------------------------------- masking flags
def flags_by_defense(db_path: str | Path) -> dict[str, set[str]]:
    """The leaderboard's masking flags of each defense in the database (newest generation), as
    stable keys; the nightly report diffs them between runs."""
    from leaderboard.report import build_report

    flags: dict[str, set[str]] = {}
    for data in build_report(db_path)["datasets"]:
        for entry in data["defenses"]:
            flags.setdefault(entry["defense"], set()).update(f["key"] for f in entry["flags"])
    return flags


def worst_cases(db_path: str | Path, defenses: set[str]) -> dict[str, Any]:
    """Per defense and threat model, the leaderboard's own worst case (per example, nested over eps,
    reference evaluations beside it, not in it): one definition, so the nightly report and the
    leaderboard never disagree. ``mean`` is over the defense's threat models."""
    from leaderboard.report import build_report

    out: dict[str, Any] = {}
    for data in build_report(db_path)["datasets"]:
        for entry in data["defenses"]:
            if entry["defense"] not in defenses:
                continue
            threats = {
                f"{t['norm']} {t['eps']:g}": {"accuracy": t["value"], "n": t["n"]}
                for t in entry["worst_case_by_threat"]
            }
            if threats:
                mean = float(np.mean([t["accuracy"] for t in threats.values()]))
                out[entry["defense"]] = {"threats": threats, "mean": mean}
    return out


# ------------------------------------------------------------------------------------ snapshot
def cell_id(cell: Mapping[str, Any]) -> str:
    """What makes two cells of different runs 'the same cell' (their keys differ once code changes)."""
    return (
        f"{cell['dataset']}/{cell['defense_id']}/{cell['attack_id']}/{cell['norm']} {cell['eps']:g}/"
        f"seed {cell['seed']}/n {cell['n_eval']}"
    )


def take_snapshot(store: Store, run_id: int, summary: RunSummary) -> dict[str, Any]:
    """Everything the next nightly run compares against, computed from the cells this run covered."""
    run = store.run(run_id)
    rows = store.connection.execute(
        "SELECT c.* FROM cells c JOIN run_cells r ON r.cell_key = c.cell_key WHERE r.run_id = ? ORDER BY c.cell_key",
        (run_id,),
    ).fetchall()
    cells = []
    for row in rows:
        ok = row["status"] == "ok"
        attacked = round(row["clean_accuracy"] * row["n_eval"]) if ok else 0
        cell = {
            "cell_key": row["cell_key"],
            "dataset": row["dataset"],
            "defense_id": row["defense_id"],
            "attack_id": row["attack_id"],
            "attack_version": row["attack_version"],
            "training_key": row["training_key"],
            "norm": row["norm"],
            "eps": row["eps"],
            "seed": row["seed"],
            "n_eval": row["n_eval"],
            "status": row["status"],
            "error": row["error"],
            "robust_accuracy": row["robust_accuracy"],
            "wall_time": row["wall_time"],
            "attacked": attacked,
            "computed": row["cell_key"] in summary.computed_keys,
        }
        cells.append(cell)
    covered = {c["defense_id"] for c in cells}
    return {
        "run": {
            "run_id": run_id,
            "started_at": run["started_at"],
            "git_commit": run["git_commit"],
            "versions": json.loads(run["versions"]),
            "device": run["device"],
        },
        "cells": cells,
        "worst_case": worst_cases(store.path, covered),
        "flags": {d: sorted(f) for d, f in flags_by_defense(store.path).items() if d in covered},
        "attack_speed": _attack_speed(cells),
        "defenses": sorted(covered),
        "attacks": sorted({c["attack_id"] for c in cells}),
        "failures": [list(f) for f in summary.failed],
    }


def _attack_speed(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per attack: wall time per attacked example over the cells this run computed (cached cells
    carry the timing of an earlier run, which would dilute a slowdown); over all its cells when
    none was computed, as a baseline for the next run."""
    totals: dict[str, dict[str, Any]] = {}
    for attack in sorted({c["attack_id"] for c in cells if c["status"] == "ok"}):
        ok = [c for c in cells if c["attack_id"] == attack and c["status"] == "ok"]
        computed = [c for c in ok if c["computed"]]
        timed = computed or ok
        wall_time = sum(c["wall_time"] for c in timed)
        examples = sum(c["attacked"] for c in timed)
        totals[attack] = {
            "wall_time": wall_time,
            "examples": examples,
            "computed": bool(computed),
            "per_example": wall_time / examples if examples else None,
        }
    return totals


# ---------------------------------------------------------------------------------- comparison
def compare(
    previous: Mapping[str, Any] | None, current: Mapping[str, Any], max_slowdown: float = DEFAULT_MAX_SLOWDOWN
) -> dict[str, Any]:
    """The regression report: what changed between two snapshots, and whether any of it regressed."""
    report: dict[str, Any] = {
        "run": current["run"],
        "previous": previous["run"] if previous else None,
        "max_slowdown": max_slowdown,
        "changed_cells": [],
        "worst_case": [],
        "flags": {"new": {}, "cleared": {}},
        "defenses": {"added": [], "removed": []},
        "attacks": {"added": [], "removed": []},
        "attack_speed": [],
        "dropped_cells": [],
        "failures": current["failures"],
        "history_plot": HISTORY_PLOT,
    }
    reasons = []
    if current["failures"]:
        reasons.append(f"{len(current['failures'])} failure(s) in this run")
    if previous is not None:
        report["changed_cells"] = _changed_cells(previous, current)
        report["worst_case"] = _worst_case_changes(previous, current)
        report["flags"] = _flag_changes(previous, current)
        for kind in ("defenses", "attacks"):
            before, after = set(previous[kind]), set(current[kind])
            report[kind] = {"added": sorted(after - before), "removed": sorted(before - after)}
        report["attack_speed"] = _speed_changes(previous, current, max_slowdown)
        report["dropped_cells"] = _dropped_cells(previous, current)
        if report["dropped_cells"]:
            reasons.append(f"{len(report['dropped_cells'])} cell(s) no longer covered (a pairing changed)")
        if report["changed_cells"]:
            reasons.append(f"{len(report['changed_cells'])} cell(s) moved outside their 95% confidence interval")
        moved = [w["defense"] for w in report["worst_case"] if w["changed"]]
        if moved:
            reasons.append(f"worst case changed for {', '.join(moved)}")
        if report["flags"]["new"]:
            reasons.append(f"new masking flags for {', '.join(sorted(report['flags']['new']))}")
        for kind in ("defenses", "attacks"):
            if report[kind]["removed"]:
                reasons.append(f"{kind} removed: {', '.join(report[kind]['removed'])}")
        slower = [s["attack"] for s in report["attack_speed"] if s["slower"]]
        if slower:
            reasons.append(f"slower than {max_slowdown:g}x: {', '.join(slower)}")
    report["regressed"] = bool(reasons)
    report["reasons"] = reasons
    return report


def _changed_cells(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[dict[str, Any]]:
    before = {cell_id(c): c for c in previous["cells"] if c["status"] == "ok"}
    changed = []
    for cell in current["cells"]:
        old = before.get(cell_id(cell))
        if old is None or cell["status"] != "ok":
            continue
        moved, interval = outside(old["robust_accuracy"], cell["robust_accuracy"], cell["n_eval"])
        if not moved:
            continue
        causes = []
        if old["attack_version"] != cell["attack_version"]:
            causes.append("attack code changed")
        if old["training_key"] != cell["training_key"]:
            causes.append("defense retrained")
        changed.append(
            {
                "defense": cell["defense_id"],
                "attack": cell["attack_id"],
                "threat": f"{cell['norm']} {cell['eps']:g}",
                "seed": cell["seed"],
                "n_eval": cell["n_eval"],
                "before": old["robust_accuracy"],
                "after": cell["robust_accuracy"],
                "interval": list(interval),
                "direction": "weaker attack / stronger defense"
                if cell["robust_accuracy"] > old["robust_accuracy"]
                else "stronger attack / weaker defense",
                "cause": ", ".join(causes) or "same code (nondeterminism?)",
                "cell_key": cell["cell_key"],
                "previous_cell_key": old["cell_key"],
            }
        )
    return sorted(changed, key=lambda c: (c["defense"], c["attack"], c["threat"], c["seed"]))


def _dropped_cells(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Cells of the previous run whose defense and attack are both still covered, but not the cell."""
    now = {cell_id(c) for c in current["cells"]}
    defenses, attacks = set(current["defenses"]), set(current["attacks"])
    return sorted(
        cell_id(c)
        for c in previous["cells"]
        if c["defense_id"] in defenses and c["attack_id"] in attacks and cell_id(c) not in now
    )


def _worst_case_changes(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for defense, now in sorted(current["worst_case"].items()):
        then = previous["worst_case"].get(defense)
        if then is None:
            continue
        threats = []
        for threat, value in sorted(now["threats"].items()):
            old = then["threats"].get(threat)
            if old is None:
                continue
            moved, interval = outside(old["accuracy"], value["accuracy"], value["n"])
            if moved:
                before, after = old["accuracy"], value["accuracy"]
                threats.append({"threat": threat, "before": before, "after": after, "interval": list(interval)})
        rows.append({"defense": defense, "before": then["mean"], "after": now["mean"], "changed": threats})
    return rows


def _flag_changes(previous: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, dict[str, list[str]]]:
    new, cleared = {}, {}
    for defense in sorted(set(previous["flags"]) | set(current["flags"])):
        before, after = set(previous["flags"].get(defense, [])), set(current["flags"].get(defense, []))
        if defense in current["defenses"] and after - before:
            new[defense] = sorted(after - before)
        if defense in previous["defenses"] and defense in current["defenses"] and before - after:
            cleared[defense] = sorted(before - after)
    return {"new": new, "cleared": cleared}


def _speed_changes(previous: Mapping[str, Any], current: Mapping[str, Any], max_slowdown: float) -> list[dict]:
    rows = []
    for attack, now in sorted(current["attack_speed"].items()):
        then = previous["attack_speed"].get(attack)
        if then is None or not then["per_example"] or not now["per_example"]:
            continue
        ratio = now["per_example"] / then["per_example"]
        rows.append(
            {
                "attack": attack,
                "before": then["per_example"],
                "after": now["per_example"],
                "ratio": ratio,
                "rerun": now["computed"],
                "slower": bool(now["computed"] and ratio > max_slowdown and now["wall_time"] >= MIN_TIMED_SECONDS),
            }
        )
    return rows


# ------------------------------------------------------------------------------------- outputs
def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def render_markdown(report: Mapping[str, Any]) -> str:
    run, previous = report["run"], report["previous"]
    lines = ["# Nightly regression report", ""]
    commit = (run["git_commit"] or "unknown commit")[:12]
    lines.append(
        f"Run {run['run_id']} ({run['started_at']}, commit {commit}, torch {run['versions'].get('torch')}, "
        f"device {run['device']})"
        + (
            f" compared with run {previous['run_id']} ({previous['started_at']}, "
            f"commit {(previous['git_commit'] or 'unknown')[:12]})."
            if previous
            else ": no previous nightly run in this database, so this one is the baseline."
        )
    )
    lines.append("")
    if report["regressed"]:
        lines += ["**Regressed:**", "", *[f"- {r}" for r in report["reasons"]], ""]
    else:
        lines += ["**No regressions.**", ""]
    if report["changed_cells"]:
        lines += [
            "## Cells outside their 95% confidence interval",
            "",
            "| defense | attack | threat | seed | before | 95% interval | after | cause |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in report["changed_cells"]:
            low, high = c["interval"]
            lines.append(
                f"| {c['defense']} | {c['attack']} | {c['threat']} | {c['seed']} | {_pct(c['before'])} | "
                f"{_pct(low)}–{_pct(high)} | **{_pct(c['after'])}** | {c['cause']} |"
            )
        lines.append("")
    if report["worst_case"]:
        lines += ["## Worst case per defense", "", "| defense | before | after | changed at |", "|---|---|---|---|"]
        for w in report["worst_case"]:
            changed = ", ".join(f"{t['threat']}: {_pct(t['before'])} → {_pct(t['after'])}" for t in w["changed"])
            lines.append(f"| {w['defense']} | {_pct(w['before'])} | {_pct(w['after'])} | {changed or '–'} |")
        lines.append("")
    flags = report["flags"]
    if flags["new"] or flags["cleared"]:
        lines += ["## Masking flags", ""]
        lines += [f"- new for {d}: {', '.join(f)}" for d, f in flags["new"].items()]
        lines += [f"- cleared for {d}: {', '.join(f)}" for d, f in flags["cleared"].items()]
        lines.append("")
    for kind in ("defenses", "attacks"):
        for change in ("added", "removed"):
            if report[kind][change]:
                lines += [f"{kind.capitalize()} {change}: {', '.join(report[kind][change])}", ""]
    if report["attack_speed"]:
        lines += [
            "## Attack speed (wall time per attacked example)",
            "",
            "| attack | before (ms) | after (ms) | ratio | re-run |",
            "|---|---|---|---|---|",
        ]
        for s in report["attack_speed"]:
            mark = " **slower**" if s["slower"] else ""
            lines.append(
                f"| {s['attack']} | {1000 * s['before']:.2f} | {1000 * s['after']:.2f} | {s['ratio']:.2f}{mark} | "
                f"{'yes' if s['rerun'] else 'no (cached)'} |"
            )
        lines.append("")
    if report["dropped_cells"]:
        lines += ["## Cells no longer covered", "", *[f"- {c}" for c in report["dropped_cells"]], ""]
    if report["failures"]:
        lines += ["## Failures", "", *[f"- {what}: {why}" for what, why in report["failures"]], ""]
    lines += ["## Worst case over nightly runs", "", f"![worst case per defense over nightly runs]({HISTORY_PLOT})", ""]
    return "\n".join(lines)


def record_and_report(
    store: Store, run_id: int, summary: RunSummary, out_dir: str | Path, max_slowdown: float = DEFAULT_MAX_SLOWDOWN
) -> tuple[dict[str, Any], list[Path]]:
    """Snapshot this nightly run, compare it with the previous one, write the report files (the
    history plot comes with the leaderboard, written into the same folder)."""
    snapshot = take_snapshot(store, run_id, summary)
    earlier = [s for r, s in store.nightly_snapshots() if r < run_id]
    store.put_nightly(run_id, snapshot)
    report = compare(earlier[-1] if earlier else None, snapshot, max_slowdown)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (out / REPORT_MD).write_text(render_markdown(report))
    return report, [out / REPORT_MD, out / REPORT_JSON]
