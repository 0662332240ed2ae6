"""The README's AutoAttack table, from a leaderboard.json that holds AutoAttack reference cells.

    robustmatrix run --config examples/matrices/autoattack-oracle.toml
    python examples/autoattack_table.py results/leaderboard.json

One row per defense with a reference evaluation, one column per Lp threat model: AutoAttack's robust
accuracy / the worst case's, and a count of the examples only AutoAttack broke where there are any."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(report: dict) -> str:
    lines = []
    for dataset in report["datasets"]:
        rows = [d for d in dataset["defenses"] if any(t.get("reference") for t in d["worst_case_by_threat"])]
        threats = sorted({(t["norm"], t["eps"]) for d in rows for t in d["worst_case_by_threat"] if t.get("reference")})
        header = ["defense", *(f"{norm} {eps:g}" for norm, eps in threats)]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for entry in rows:
            by_threat = {(t["norm"], t["eps"]): t for t in entry["worst_case_by_threat"]}
            cells = []
            for threat in threats:
                t = by_threat.get(threat)
                reference = t.get("reference") if t else None
                if reference is None:
                    cells.append("–")
                    continue
                text = f"{reference['value']:.3f} / {t['value']:.3f}"
                if reference["beyond"]:
                    text += f" ({reference['beyond']})"
                cells.append(f"**{text}**" if t["value"] > reference["value"] + 1e-12 else text)
            lines.append("| " + " | ".join([f"`{entry['defense']}`", *cells]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "results/leaderboard.json").read_text())))
