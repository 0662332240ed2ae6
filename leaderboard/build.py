"""``robustmatrix leaderboard``: rebuild every output file from the database alone.

Writes into the output folder: leaderboard.md (tabulate), leaderboard.csv, leaderboard.json (the
validated report), index.html (one self-contained page, page.py: its figures are inline SVG and its
script inline, no network request), and the figures as PNG files for papers.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path
from typing import Any

from bench.foundation.errors import RobustMatrixError
from bench.storage.store import Store
from leaderboard import page as html_page
from leaderboard import plots
from leaderboard.curves import norms_of
from leaderboard.families import styles
from leaderboard.report import build_report
from leaderboard.tables import markdown, write_csv

HISTORY_PNG = "nightly-history.png"


def _encoded(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _nightly_snapshots(db_path: Path) -> list[tuple[int, dict[str, Any]]]:
    with Store.open_readonly(db_path) as store:
        present = {r[0] for r in store.connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return store.nightly_snapshots() if "nightly" in present else []


def section_keys(datasets: list[dict[str, Any]]) -> list[str]:
    """A file-name- and anchor-safe key per section: the dataset name, with the evaluation size when the
    dataset has sections of several sizes."""
    names = [d["dataset"] for d in datasets]
    keys = [
        name if names.count(name) == 1 else f"{name}-n{d['n_eval']}" for name, d in zip(names, datasets, strict=True)
    ]
    return [re.sub(r"[^A-Za-z0-9_.-]+", "_", key) for key in keys]


def write_leaderboard(db_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write every leaderboard file into ``out_dir``; returns the paths written (leaderboard.md first)."""
    db_path = Path(db_path)
    report = build_report(db_path)
    if not report["datasets"]:
        raise RobustMatrixError(f"{db_path} holds no evaluated defenses yet; run `robustmatrix run` first")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RobustMatrixError(f"cannot create the output folder {out}: {exc.strerror}") from None
    for data in report["datasets"]:
        for text in data["warnings"]:
            print(f"robustmatrix: warning: {text}", file=sys.stderr)
    sections = section_keys(report["datasets"])
    several = len(sections) > 1
    written: list[Path] = []
    heatmaps: list[str] = []
    for data, key in zip(report["datasets"], sections, strict=True):
        prefix = f"{key}-" if several else ""
        heat = plots.heatmap(data, out / f"{prefix}heatmap.png")
        look = styles(data["defenses"])
        written += [heat, *(plots.curves(data, n, out / f"{prefix}curves-{n}.png", look) for n in norms_of(data))]
        heatmaps.append(heat.name)
    snapshots = _nightly_snapshots(db_path)
    history = plots.worst_case_history(snapshots, out / HISTORY_PNG) if snapshots else None
    if history is not None:
        written.append(history)

    md = out / "leaderboard.md"
    md.write_text("# robustmatrix leaderboard\n\n" + "\n".join(markdown(d) for d in report["datasets"]))
    csv = out / "leaderboard.csv"
    write_csv(report["datasets"], csv)
    js = out / "leaderboard.json"
    js.write_text(json.dumps(report, indent=1, sort_keys=True, allow_nan=False) + "\n")
    page = out / "index.html"
    page.write_text(html_page.render(report, sections, heatmaps, _encoded(history) if history else None))
    return [md, csv, js, page, *written]
