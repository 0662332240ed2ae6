"""``robustmatrix plan``: the cost of a matrix as tables, before anything runs — so a user (or the
nightly job) knows whether the night, or the GPU allocation, is long enough."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch
from tabulate import tabulate

from bench.execution.launch import keyed_environment
from bench.execution.plan import MatrixPlan, plan_matrix
from bench.execution.pool_executor import auto_workers
from bench.foundation.config import MatrixSpec
from bench.foundation.device import resolve_device, worker_devices
from bench.foundation.errors import RobustMatrixError

_DEVICE = re.compile(r"^(cpu|cuda|cuda:[0-9]+)$")


def plan_device(name: str, throughput: float | None) -> torch.device:
    """The device to plan for. With a given ``--throughput`` nothing is measured, so the plan may be
    for a GPU this machine does not have (``--device cuda``)."""
    if throughput is not None and isinstance(name, str) and _DEVICE.match(name) and not torch.cuda.is_available():
        return torch.device(name)
    return resolve_device(name)


def plan_workers(device: torch.device, name: str, workers: int | None) -> int:
    if workers is not None:
        return workers
    if device.type == "cuda" and not torch.cuda.is_available():
        return 1  # a GPU planned from elsewhere: one, unless --workers says how many
    return auto_workers(worker_devices(name))


def _millions(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e6:,.2f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render(plan: MatrixPlan, cells: bool = True) -> str:
    """The plan as text: trainings, cells per (defense, attack) with their eps, the throughput used,
    the assumptions, and the totals."""
    out = []
    rows = [
        [
            t.defense_id,
            t.seed,
            t.architecture,
            t.epochs,
            _millions(t.forwards),
            _millions(t.backwards),
            "cached" if t.cached else _duration(t.seconds),
        ]
        for t in sorted(plan.trainings, key=lambda t: -t.seconds)
    ]
    headers = ["training", "seed", "architecture", "epochs", "forwards (M)", "backwards (M)", "time"]
    out.append(tabulate(rows, headers=headers, tablefmt="simple"))
    if cells:
        grouped: dict[tuple[str, int, str], list] = defaultdict(list)
        for cell in plan.cells:
            grouped[(cell.defense_id, cell.seed, cell.attack_id)].append(cell)
        rows = []
        for (defense, _seed, attack), group in grouped.items():
            computed = [c for c in group if not (c.cached or c.shared)]
            forwards = sum(c.forwards or 0 for c in computed) if all(c.forwards is not None for c in group) else None
            backwards = sum(c.backwards or 0 for c in computed) if all(c.forwards is not None for c in group) else None
            cached = sum(c.cached for c in group)
            eps = ", ".join(f"{c.eps:g}" for c in group)
            note = "one run for every eps" if any(c.shared for c in group) else ""
            rows.append(
                [
                    defense,
                    attack,
                    f"{group[0].norm} {eps}",
                    group[0].examples,
                    _millions(forwards),
                    _millions(backwards),
                    f"{cached}/{len(group)}" if cached else "",
                    _duration(sum(c.seconds for c in group)),
                    note,
                ]
            )
        headers = ["defense", "attack", "eps", "examples", "forwards (M)", "backwards (M)", "cached", "time", ""]
        out.append(tabulate(rows, headers=headers, tablefmt="simple"))
    out.append(
        "throughput (examples/s): "
        + "; ".join(
            f"{arch}: forward {t.forward:,.0f}, attack step {t.gradient:,.0f}, "
            f"training step {t.training:,.0f} — {t.source}"
            for arch, t in plan.throughput.items()
        )
    )
    out.append("assumptions:\n" + "\n".join(f"  - {a}" for a in plan.assumptions))
    trainings = [t for t in plan.trainings if not t.cached]
    todo = [c for c in plan.cells if not c.cached]
    wall, pole = plan.wall_seconds()
    totals = [
        [
            "trainings",
            f"{len(trainings)} of {len(plan.trainings)}",
            _millions(sum(t.forwards + t.backwards for t in trainings)),
        ],
        [
            "cells",
            f"{len(todo)} of {len(plan.cells)}",
            _millions(sum((c.forwards or 0) + (c.backwards or 0) for c in todo if not c.shared)),
        ],
        ["all", "", _millions(plan.passes)],
    ]
    out.append(tabulate(totals, headers=["to compute", "jobs", "passes (M)"], tablefmt="simple"))
    out.append(
        f"estimated: {_duration(plan.work_seconds)} of work; {_duration(wall)} wall on {plan.workers} "
        f"worker{'s' if plan.workers > 1 else ''} ({plan.device}); longest pole: {pole}"
    )
    return "\n\n".join(out)


def run_plan(
    spec: MatrixSpec,
    *,
    device_name: str,
    workers: int | None,
    db_path: Path | None,
    data_dir: str | None,
    throughput: float | None,
    threads: int,
    cold: bool,
) -> MatrixPlan:
    if throughput is not None and not throughput > 0:
        raise RobustMatrixError(f"--throughput must be a positive number of passes per second, got {throughput:g}")
    device = plan_device(device_name, throughput)
    count = plan_workers(device, device_name, workers)
    return plan_matrix(
        spec,
        device=device,
        workers=count,
        db_path=db_path,
        data_dir=data_dir,
        throughput=throughput,
        threads=threads,
        environment=keyed_environment(str(device), threads),
        cold=cold,
    )
