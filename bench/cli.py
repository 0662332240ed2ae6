"""The ``robustmatrix`` command.

Bad input never produces a traceback: every user-facing problem is a ``RobustMatrixError`` printed
as one line, with exit status 2. A run that completes with failed cells exits 1; Ctrl-C exits 130
(everything finished so far is already in the database). An unexpected internal error prints one
line naming where it happened and exits 3; ROBUSTMATRIX_DEBUG=1 re-raises it with its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from bench.errors import RobustMatrixError

EXIT_OK, EXIT_FAILED_CELLS, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEFAULT_RESULTS = Path("results")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise RobustMatrixError(f"{self.prog}: {message}")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robustmatrix", description="Attack-vs-defense benchmark for adversarial robustness.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    listing = sub.add_parser("list", help="registered defenses and attacks with their declared properties")
    listing.add_argument("pattern", nargs="*", default=["*"], help="ids or wildcards (default: all)")
    listing.add_argument("--kind", choices=["defense", "attack"], help="only defenses or only attacks")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument("--dataset", default="digits", help="show kwargs resolved for this dataset")

    run = sub.add_parser("run", help="run the missing cells of the matrix, then write the leaderboard")
    run.add_argument("--config", type=Path, help="matrix spec (TOML); default: the built-in matrix")
    run.add_argument("--quick", action="store_true", help="the quick preset: fewer examples, epochs and eps")
    run.add_argument("--db", type=Path, help="results database (default: results/robustmatrix.db)")
    run.add_argument("--out", type=Path, help="leaderboard folder (default: results/)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    run.add_argument("--defense", action="append", metavar="ID", help="only these defenses (repeatable)")
    run.add_argument("--data-dir", help="where dataset files are (and are downloaded to)")
    run.add_argument("--no-download", action="store_true", help="never download dataset files")
    run.add_argument("--retry-failed", action="store_true", help="re-run cells recorded as failed")
    run.add_argument("--quiet", action="store_true", help="no progress output")

    check = sub.add_parser("check", help="sanity-check a defense or attack (e.g. a plugin) before it enters the matrix")
    check.add_argument("id", help="a registered defense or attack id")
    check.add_argument("--dataset", default="digits", help="dataset to check on (default: digits)")
    check.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--data-dir", help="where dataset files are (and are downloaded to)")
    check.add_argument("--json", action="store_true", help="machine-readable findings")

    scaffold = sub.add_parser("new-defense", help="write a defense plugin package that passes `check` as generated")
    scaffold.add_argument("name", help="plugin name, lowercase words joined by '-' (the defense id is NAME-v1)")
    scaffold.add_argument("--dir", type=Path, default=Path("."), help="parent folder (default: .)")

    board = sub.add_parser("leaderboard", help="rebuild the leaderboard from the database alone")
    board.add_argument("--db", type=Path, default=DEFAULT_RESULTS / "robustmatrix.db")
    board.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    return parser


def _load_components() -> None:
    """Built-ins, then plugins; a broken plugin is named and skipped, the others still load."""
    from bench.registry import load_builtins, load_plugins

    load_builtins()
    for failure in load_plugins():
        print(f"robustmatrix: error: {failure.message()}", file=sys.stderr)


def _cmd_list(args: argparse.Namespace) -> int:
    from bench.registry import ATTACKS, DEFENSES

    kinds = [args.kind] if args.kind else ["defense", "attack"]
    entries = []
    for kind in kinds:
        registry = DEFENSES if kind == "defense" else ATTACKS
        entries += [registry.get(i).describe(args.dataset) for i in registry.ids(args.pattern)]
    if args.json:
        print(json.dumps(entries, indent=2, sort_keys=True))
        return EXIT_OK
    from tabulate import tabulate

    for kind in kinds:
        rows = [e for e in entries if e["kind"] == kind]
        if kind == "defense":
            table = [[e["id"], _threats(e["trained_against"]), _nature(e), e["source"], e["description"]] for e in rows]
            headers = ["defense", "trained against", "nature", "source", "description"]
        else:
            table = [
                [e["id"], e["family"], e["norm"], e["applies_to"], _budget(e["budget"]), e["source"], e["description"]]
                for e in rows
            ]
            headers = ["attack", "family", "norm", "applies to", "budget", "source", "description"]
        print(tabulate(table, headers=headers, tablefmt="simple") + "\n")
    return EXIT_OK


def _threats(threats: list[dict]) -> str:
    return ", ".join(f"{t['attack']} {t['norm']} {t['eps']:g}" for t in threats) or "–"


def _nature(entry: dict) -> str:
    words = [
        "randomized" if entry["randomized"] else "",
        "non-differentiable" if not entry["differentiable"] else "",
        "saturated softmax" if entry["saturates_softmax"] else "",
        "probabilities" if not entry["outputs_logits"] else "",
    ]
    return ", ".join(w for w in words if w) or "deterministic, differentiable"


def _budget(budget: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in budget.items() if v is not None) or "–"


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def _matrix_of_last_run(db_path: Path):  # noqa: ANN202 - MatrixSpec, imported lazily
    """The matrix that built an existing leaderboard: `run --defense ID` adds a row to *that* table."""
    from bench.config import spec_from_mapping
    from bench.store import Store

    if not db_path.exists():
        return None
    with Store.open_existing(db_path) as store:
        row = store.connection.execute("SELECT config FROM runs ORDER BY run_id DESC LIMIT 1").fetchone()
    if row is None:
        return None
    return spec_from_mapping(json.loads(row["config"]), f"the last run recorded in {db_path}")


def _cmd_run(args: argparse.Namespace) -> int:
    from bench.config import load_spec
    from bench.device import resolve_device
    from bench.executor import LocalExecutor
    from bench.keys import versions
    from bench.progress import Progress
    from bench.registry import DEFENSES
    from bench.runner import Runner, checkpoint_dir
    from bench.store import Store
    from bench.workbench import Workbench
    from leaderboard.build import write_leaderboard

    default_root = DEFAULT_RESULTS / "quick" if args.quick else DEFAULT_RESULTS
    db_path = args.db or default_root / "robustmatrix.db"
    spec = load_spec(args.config, quick=args.quick)
    if args.defense and args.config is None:
        spec = _matrix_of_last_run(db_path) or spec
    device = resolve_device(args.device)
    out_dir = args.out or default_root
    progress = Progress(enabled=not args.quiet)
    workbench = Workbench(
        spec.dataset,
        device,
        checkpoint_dir(db_path),
        data_dir=args.data_dir or spec.data_dir,
        download=spec.download and not args.no_download,
        on_epoch=progress.epoch,
        on_batch=progress.batch,
    )
    runner = Runner(spec, workbench.data, LocalExecutor(workbench), progress, args.retry_failed)
    if args.defense:
        DEFENSES.select(args.defense)
    with Store.open(db_path) as store:
        run_id = store.start_run("run", spec.to_dict(), str(device), versions(), _git_commit())
        try:
            summary = runner.run(store, args.defense)
        except BaseException:
            store.finish_run(run_id, "interrupted", 0, 0)
            raise
        store.finish_run(run_id, "ok" if summary.ok else "failed", summary.computed, len(summary.failed))
    written = write_leaderboard(db_path, out_dir)
    print(written[0].read_text())
    print(
        f"{summary.trained} defenses trained, {summary.computed} cells computed, {summary.skipped} already in "
        f"{db_path}; leaderboard in {out_dir}/",
        file=sys.stderr,
    )
    if summary.failed:
        print(f"robustmatrix: {len(summary.failed)} cell(s) failed:", file=sys.stderr)
        for label, reason in summary.failed:
            print(f"  {label}: {reason}", file=sys.stderr)
        print("re-run them with --retry-failed", file=sys.stderr)
        return EXIT_FAILED_CELLS
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bench.check import FAIL, check_attack, check_defense
    from bench.data import load_dataset
    from bench.device import resolve_device
    from bench.registry import ATTACKS, DEFENSES

    if args.id in DEFENSES:
        spec, check = DEFENSES.get(args.id), check_defense
    elif args.id in ATTACKS:
        spec, check = ATTACKS.get(args.id), check_attack
    else:
        DEFENSES.get(args.id)  # raises with the closest defense ids
        raise AssertionError("unreachable")
    device = resolve_device(args.device)
    data = load_dataset(args.dataset, args.data_dir)
    findings = check(spec, data, device, args.seed)
    failed = [f for f in findings if f.status == FAIL]
    if args.json:
        print(json.dumps([vars(f) for f in findings], indent=2))
    else:
        print(f"robustmatrix check {spec.id} ({spec.source}) on {args.dataset}:")
        print(tabulate([[f.status.upper(), f.check, f.evidence] for f in findings], tablefmt="plain"))
        warnings = sum(f.status == "warn" for f in findings)
        verdict = "FAILED" if failed else "passed"
        print(f"\n{verdict}: {len(failed)} failure(s), {warnings} warning(s), {len(findings)} checks")
    return EXIT_FAILED_CELLS if failed else EXIT_OK


def _cmd_new_defense(args: argparse.Namespace) -> int:
    from bench.scaffold import new_defense

    root = new_defense(args.name, args.dir)
    print(f"wrote {root}/: install it with `pip install {root}`, then `robustmatrix check {args.name}-v1`")
    return EXIT_OK


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from leaderboard.build import write_leaderboard

    written = write_leaderboard(args.db, args.out)
    print("\n".join(str(p) for p in written))
    return EXIT_OK


COMMANDS = {
    "list": _cmd_list,
    "run": _cmd_run,
    "check": _cmd_check,
    "new-defense": _cmd_new_defense,
    "leaderboard": _cmd_leaderboard,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _build_parser().parse_args(argv)
        if args.command not in ("leaderboard", "new-defense"):
            _load_components()
        return COMMANDS[args.command](args)
    except RobustMatrixError as exc:
        print(f"robustmatrix: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("robustmatrix: interrupted; finished cells are saved, run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if os.environ.get("ROBUSTMATRIX_DEBUG"):
            raise
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        print(
            f"robustmatrix: internal error: {type(exc).__name__}: {exc} (at {where}; "
            "set ROBUSTMATRIX_DEBUG=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
