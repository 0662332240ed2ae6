"""Re-attack single examples of a run with each AutoAttack component, several random restarts each.

Reproduces the README's note on the examples only AutoAttack broke: for every example a leaderboard
lists under a reference evaluation's ``beyond_examples``, how many of N restarts of APGD-CE,
APGD-DLR and APGD-T (100 steps; APGD-T over 9 targets) and of 2 of FAB-T (100 x 9) and Square
(5,000 queries) break it alone:

    python examples/reattack_examples.py results/leaderboard.json --db results/robustmatrix.db
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from attacks.base import Victim, predict
from bench.execution.runner import Runner
from bench.execution.workbench import Workbench
from bench.foundation.config import load_spec
from bench.foundation.data import load_dataset
from bench.foundation.keys import seed_everything
from bench.foundation.plugins import load_builtins
from bench.foundation.registry import ATTACKS, DEFENSES


def components(norm: str) -> list[tuple[str, str, dict, bool]]:
    """(name, attack id, kwargs, restarts many times?)"""
    return [
        ("apgd-ce", f"apgd-ce-{norm}-v1", {"steps": 100}, True),
        ("apgd-dlr", f"apgd-dlr-{norm}-v1", {"steps": 100}, True),
        ("apgd-t", f"apgd-t-{norm}-v1", {"steps": 100, "targets": 9}, True),
        ("fab-t", f"fab-t-{norm}-v1", {"steps": 100, "targets": 9}, False),
        ("square", f"square-{norm}-v1", {"queries": 5000, "p_init": 0.8, "rescale_schedule": False}, False),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="leaderboard.json of a run with reference cells")
    parser.add_argument("--db", required=True, help="that run's database (its checkpoints/ beside it)")
    parser.add_argument("--restarts", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_builtins()
    spec = load_spec(None)
    runner = Runner(spec, load_dataset(spec.dataset, spec.data_dir, False), executor=None)
    workbench = Workbench(spec.dataset, torch.device("cpu"), Path(args.db).parent / "checkpoints")
    x_all, y_all = workbench.eval_set(spec.n_eval)
    for dataset in json.loads(Path(args.report).read_text())["datasets"]:
        for entry in dataset["defenses"]:
            for threat in entry["worst_case_by_threat"]:
                reference = threat.get("reference") or {}
                for index in reference.get("beyond_examples", {}).get("0", []):
                    model = workbench.load(runner.training_job(DEFENSES.get(entry["defense"]), 0)).deployed
                    x, y = x_all[index : index + 1], y_all[index : index + 1]
                    broke = {}
                    for name, attack_id, kwargs, many in components(threat["norm"]):
                        wins = 0
                        for seed in range(args.restarts if many else 2):
                            seed_everything(seed)
                            attack = ATTACKS.get(attack_id).make(None, kwargs, eps=threat["eps"])
                            wins += int(predict(model, attack(Victim(model, 10), x, y))[0] != y[0])
                        broke[name] = f"{wins}/{args.restarts if many else 2}"
                    where = f"{entry['defense']} {threat['norm']} {threat['eps']:g} example {index}"
                    print(json.dumps({"example": where, "broken in": broke}), flush=True)


if __name__ == "__main__":
    main()
