"""What each escalation stage of the adaptive worst case costs and adds, cell by cell.

Reproduces the stage table in docs/components.md. First run the matrix without escalation (every
cell, and the cascade's adaptive members at their grade, but no stages), then attribute:

    robustmatrix run --config examples/matrices/no-escalation.toml --db stages/robustmatrix.db
    python examples/cascade_stages.py --db stages/robustmatrix.db \\
        pgd-at-linf-v1:linf:0.1 pgd-at-linf-v1:linf:0.2 art-jpeg-v1:linf:0.1

For each DEFENSE:NORM:EPS it takes the examples every cell at that eps or a smaller one left robust,
runs the defense's adaptive members, then each candidate stage in cascade order on what the earlier
ones left robust, through the real workbench, and prints per stage: process CPU seconds (one torch
thread), examples broken that every earlier stage missed, and examples it was run on."""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.execution.runner import Runner
from bench.execution.workbench import Workbench
from bench.foundation.config import load_spec
from bench.foundation.data import load_dataset
from bench.foundation.plugins import load_builtins
from bench.foundation.registry import DEFENSES
from bench.storage.store import decode_mask, encode_mask

NO_ESCALATION = Path(__file__).parent / "matrices" / "no-escalation.toml"


def candidates(norm: str) -> list[tuple[str, list]]:
    """AutoAttack's four stages at its budgets, and Square at 1,000 queries, in cascade order."""
    if norm == "l1":
        return [("pgd-l1 100x2", ["pgd-l1-v1", {"steps": 100, "restarts": 2}])]
    return [
        ("apgd-ce 100", [f"apgd-ce-{norm}-v1", {"steps": 100}]),
        ("apgd-t 100x9", [f"apgd-t-{norm}-v1", {"steps": 100, "targets": 9}]),
        ("square 1000", [f"square-{norm}-v1", {"queries": 1000, "p_init": 0.8}]),
        ("fab-t 100x9", [f"fab-t-{norm}-v1", {"steps": 100, "targets": 9}]),
        ("square 5000", [f"square-{norm}-v1", {"queries": 5000, "p_init": 0.8, "rescale_schedule": False}]),
    ]


def attribute(runner: Runner, workbench: Workbench, connection: sqlite3.Connection, cell: str) -> dict:
    defense, norm, eps_text = cell.split(":")
    eps = float(eps_text)
    training = runner.training_job(DEFENSES.get(defense), 0)
    row = connection.execute("SELECT * FROM evaluations WHERE training_key = ?", (training.training_key,)).fetchone()
    if row is None:
        raise SystemExit(f"{defense} has no evaluation in this database: run the no-escalation matrix first")
    evaluation = {"observed": row["observed"], "clean_mask": row["clean_mask"]}
    jobs = runner.cell_jobs(training, evaluation, {})
    job = next(j for j in jobs if j.attack_id.startswith("adaptive-worst-case") and j.norm == norm and j.eps == eps)
    n_eval = job.n_eval
    alive = decode_mask(row["clean_mask"], n_eval)
    cells = connection.execute(
        "SELECT robust_mask FROM cells WHERE training_key = ? AND norm = ? AND eps <= ? AND status = 'ok'"
        " AND attack_id NOT LIKE 'adaptive-worst-case%'",
        (training.training_key, norm, eps + 1e-12),
    )
    for (mask,) in cells:
        alive = alive & decode_mask(mask, n_eval)
    out: dict = {"cell": cell, "survivors": int(alive.sum())}
    runs = [("members", {"members": job.attack_kwargs["members"], "stages": [], "black_box": False})]
    runs += [(name, {"members": [], "stages": [stage], "black_box": False}) for name, stage in candidates(norm)]
    for name, kwargs in runs:
        if name == "members" and not kwargs["members"]:
            continue
        attempt = replace(job, attack_kwargs={**job.attack_kwargs, **kwargs}, prior_robust=encode_mask(alive))
        start = time.process_time()
        record = workbench.run_cell(attempt)
        seconds = time.process_time() - start
        if record.status != "ok":
            raise SystemExit(f"{cell} {name}: {record.error}")
        robust = np.asarray(record.robust_mask, dtype=bool)
        out[name] = {"cpu_seconds": round(seconds, 1), "broke": int((alive & ~robust).sum()), "on": int(alive.sum())}
        alive = alive & robust
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True, help="the no-escalation run's database")
    parser.add_argument("--config", default=str(NO_ESCALATION), help="the matrix that run used")
    parser.add_argument("cells", nargs="+", metavar="DEFENSE:NORM:EPS")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_builtins()
    spec = load_spec(args.config)
    runner = Runner(spec, load_dataset(spec.dataset, spec.data_dir, False), executor=None)
    workbench = Workbench(spec.dataset, torch.device("cpu"), Path(args.db).parent / "checkpoints")
    connection = sqlite3.connect(f"file:{args.db}?mode=ro", uri=True)
    connection.row_factory = sqlite3.Row
    for cell in args.cells:
        print(json.dumps(attribute(runner, workbench, connection, cell)), flush=True)


if __name__ == "__main__":
    main()
