"""``robustmatrix leaderboard``: rebuild every output file from the database alone."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from tabulate import tabulate

from bench.errors import RobustMatrixError
from leaderboard.results import Results, load_results
from leaderboard.tables import summary_table


def _markdown(results: Results, table: pd.DataFrame) -> str:
    seeds = sorted(results.trainings["seed"].unique())
    header = (
        f"## {results.dataset}\n\n{results.n_eval} evaluation examples, "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(str(s) for s in seeds)}. "
        "Accuracies are fractions of the evaluation examples; *worst* columns count an example as "
        "robust only if every attack at that threat model failed on it.\n"
    )
    shown = table.copy()
    shown.insert(0, "rank", range(1, len(shown) + 1))
    body = tabulate(shown, headers="keys", tablefmt="github", showindex=False, floatfmt=".3f", missingval="–")
    failures = ""
    if not results.failed.empty:
        lines = [
            f"- {r.defense_id} × {r.attack_id} @ {r.norm} {r.eps:g}: {r.error}" for r in results.failed.itertuples()
        ]
        failures = "\n\nFailed cells (not counted):\n" + "\n".join(lines)
    return header + "\n" + body + failures + "\n"


def write_leaderboard(db_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write leaderboard.md and leaderboard.csv into ``out_dir``; returns the paths written."""
    all_results = load_results(db_path)
    if not all_results:
        raise RobustMatrixError(f"{db_path} holds no evaluated defenses yet; run `robustmatrix run` first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections, frames = [], []
    for results in all_results:
        table = summary_table(results)
        sections.append(_markdown(results, table))
        frames.append(table.assign(dataset=results.dataset, n_eval=results.n_eval))
    markdown = out / "leaderboard.md"
    markdown.write_text("# robustmatrix leaderboard\n\n" + "\n".join(sections))
    csv = out / "leaderboard.csv"
    pd.concat(frames, ignore_index=True).to_csv(csv, index=False)
    return [markdown, csv]
