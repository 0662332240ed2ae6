"""The ``robustmatrix`` command.

Bad input never produces a traceback: every user-facing problem is a ``RobustMatrixError`` printed
as one line, with exit status 2. A run that completes with failed cells exits 1; Ctrl-C exits 130
(everything finished so far is already in the database), and so does SIGTERM — Slurm's time limit — with
exit status 143. An unexpected internal error prints one
line naming where it happened and exits 3; ROBUSTMATRIX_DEBUG=1 re-raises it with its traceback.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import signal
import subprocess
import sys
import threading
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from bench.foundation.config import PRESETS
from bench.foundation.errors import RobustMatrixError

EXIT_OK, EXIT_FAILED_CELLS, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_TERMINATED = 128 + signal.SIGTERM
DEFAULT_RESULTS = Path("results")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise RobustMatrixError(f"{self.prog}: {message}")


DEVICE_HELP = "auto, cpu, cuda or cuda:N (default: auto, or $ROBUSTMATRIX_DEVICE)"


def _default_device() -> str:
    """``--device``'s default: ``auto``, or $ROBUSTMATRIX_DEVICE (the test suite sets ``cpu``, so its
    bit-for-bit comparisons run on the CPU on a GPU host too)."""
    return os.environ.get("ROBUSTMATRIX_DEVICE", "auto")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robustmatrix", description="Attack-vs-defense benchmark for adversarial robustness.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    listing = sub.add_parser("list", help="registered defenses and attacks with their declared properties")
    listing.add_argument("pattern", nargs="*", default=["*"], help="ids or wildcards (default: all)")
    listing.add_argument(
        "--kind", choices=["defense", "attack", "verifier"], help="only defenses, attacks or verifiers (opt-in)"
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument("--dataset", default="digits", help="show kwargs resolved for this dataset")
    listing.add_argument("--config", type=Path, help="also list this matrix's [pretrained] models")

    run = sub.add_parser("run", help="run the missing cells of the matrix, then write the leaderboard")
    run.add_argument("--config", type=Path, help="matrix spec (TOML); default: the built-in matrix")
    run.add_argument("--quick", action="store_true", help="the quick preset: fewer examples, epochs and eps")
    run.add_argument("--preset", choices=PRESETS, help="a built-in matrix (default: default; mnist, cifar10)")
    run.add_argument("--db", type=Path, help="results database (default: results/robustmatrix.db)")
    run.add_argument("--out", type=Path, help="leaderboard folder (default: results/)")
    run.add_argument("--device", default=_default_device(), help=DEVICE_HELP)
    run.add_argument("--defense", action="append", metavar="ID", help="only these defenses (repeatable)")
    run.add_argument("--data-dir", help="where dataset files are (and are downloaded to)")
    run.add_argument("--no-download", action="store_true", help="never download dataset files")
    run.add_argument("--retry-failed", action="store_true", help="re-run failed cells, trainings, evaluations")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    _add_execution_arguments(run)
    run.add_argument("--shard", metavar="I/N", help="run only slice I of N of the cells (for Slurm array jobs)")

    plan = sub.add_parser("plan", help="the matrix's jobs, passes and estimated time, before anything runs")
    plan.add_argument("--config", type=Path, help="matrix spec (TOML); default: the built-in matrix")
    plan.add_argument("--quick", action="store_true", help="the quick preset")
    plan.add_argument("--preset", choices=PRESETS, help="a built-in matrix (default: default; mnist, cifar10)")
    plan.add_argument("--db", type=Path, help="results database to look cached results up in (default: run's)")
    plan.add_argument("--device", default=_default_device(), help=DEVICE_HELP)
    plan.add_argument("--workers", help="worker processes the run would have (default: auto, as run)")
    plan.add_argument("--cpus-per-task", type=int, default=1, help="torch threads per job (calibrated with them)")
    plan.add_argument("--data-dir", help="where dataset files are (never downloaded by plan)")
    plan.add_argument(
        "--throughput",
        type=float,
        help="example-passes per second to assume instead of measuring (a forward or a backward is one)",
    )
    plan.add_argument(
        "--cold", action="store_true", help="cost everything, as a fresh run would, whatever the database holds"
    )
    plan.add_argument("--summary", action="store_true", help="trainings and totals only, no per-cell table")

    merge = sub.add_parser("merge", help="combine databases (e.g. of shards) into one, idempotently")
    merge.add_argument("sources", nargs="+", type=Path, metavar="DB", help="databases to merge")
    merge.add_argument("--into", type=Path, required=True, help="the combined database (created if missing)")

    nightly = sub.add_parser("nightly", help="run the matrix and report what changed since the last nightly run")
    nightly.add_argument("--config", type=Path, help="matrix spec (TOML); default: the built-in matrix")
    nightly.add_argument("--quick", action="store_true", help="the quick preset")
    nightly.add_argument("--preset", choices=PRESETS, help="a built-in matrix (default: default)")
    nightly.add_argument("--db", type=Path, default=DEFAULT_RESULTS / "robustmatrix.db", help="results database")
    nightly.add_argument("--out", type=Path, default=DEFAULT_RESULTS / "nightly", help="report folder")
    nightly.add_argument("--device", default=_default_device(), help=DEVICE_HELP)
    nightly.add_argument("--data-dir", help="where dataset files are (and are downloaded to)")
    nightly.add_argument("--no-download", action="store_true", help="never download dataset files")
    nightly.add_argument("--retry-failed", action="store_true", help="re-run failed cells, trainings, evaluations")
    nightly.add_argument("--quiet", action="store_true", help="no progress output")
    nightly.add_argument(
        "--baseline",
        action="store_true",
        help="this is the database's first nightly run (without it, a database with no previous nightly run fails)",
    )
    nightly.add_argument(
        "--max-slowdown", type=float, default=1.5, help="flag an attack this many times slower per example"
    )
    _add_execution_arguments(nightly)

    check = sub.add_parser("check", help="sanity-check a defense or attack (e.g. a plugin) before it enters the matrix")
    check.add_argument("id", help="a registered defense or attack id, or a pretrained model's")
    check.add_argument("--config", type=Path, help="matrix spec declaring the [pretrained] model to check")
    check.add_argument(
        "--dataset",
        help="dataset to check on (default: the matrix's or the model's for a pretrained model, else digits)",
    )
    check.add_argument(
        "--n-eval",
        type=int,
        help="a pretrained model's clean accuracy on this many evaluation examples (default: the matrix's "
        "n_eval with --config, else the whole test split)",
    )
    check.add_argument("--device", default=_default_device(), help=DEVICE_HELP)
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--data-dir", help="where dataset files are (and are downloaded to)")
    check.add_argument("--json", action="store_true", help="machine-readable findings")

    scaffold = sub.add_parser("new-defense", help="write a defense plugin package that passes `check` as generated")
    scaffold.add_argument("name", help="plugin name, lowercase words joined by '-' (the defense id is NAME-v1)")
    scaffold.add_argument("--dir", type=Path, default=Path("."), help="parent folder (default: .)")

    export = sub.add_parser("export", help="write a trained defense's weights and a [pretrained] table for them")
    export.add_argument("id", help="a defense id in the database")
    export.add_argument("--out", type=Path, required=True, help="folder for the weights and pretrained.toml")
    export.add_argument("--db", type=Path, default=DEFAULT_RESULTS / "robustmatrix.db", help="results database")
    export.add_argument("--seed", type=int, help="which seed's training (default: the lowest)")

    board = sub.add_parser("leaderboard", help="rebuild the leaderboard from the database alone")
    board.add_argument("--db", type=Path, default=DEFAULT_RESULTS / "robustmatrix.db")
    board.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    return parser


def _add_execution_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=["local", "ray"], default="local", help="where jobs run")
    parser.add_argument("--address", help="Ray cluster to join (auto, HOST:PORT, ray://HOST:10001); default: local")
    parser.add_argument(
        "--workers",
        help="local: worker processes (auto: one per core on a CPU, one per GPU; default: auto, "
        "or $ROBUSTMATRIX_WORKERS)",
    )
    parser.add_argument("--cpus-per-task", type=int, default=1, help="CPUs (torch threads) per job or Ray task")
    parser.add_argument("--gpus-per-task", type=float, default=1.0, help="Ray: GPUs per cell (a fraction shares)")
    parser.add_argument("--gpus-per-training", type=float, default=1.0, help="Ray: GPUs per training task")


def _execution_options(args: argparse.Namespace):  # noqa: ANN202 - ExecutionOptions, imported lazily
    from bench.execution.launch import ExecutionOptions

    return ExecutionOptions(
        executor=args.executor,
        address=args.address,
        device=args.device,
        workers=_workers(args.workers, args.executor),
        cpus_per_task=args.cpus_per_task,
        gpus_per_task=args.gpus_per_task,
        gpus_per_training=args.gpus_per_training,
    )


def _workers(value: str | None, executor: str) -> int | None:
    """``auto`` (None: the executor decides) or a positive number of worker processes. Without
    ``--workers``, $ROBUSTMATRIX_WORKERS is the local executor's default (Ray ignores it)."""
    if value is None:
        value = os.environ.get("ROBUSTMATRIX_WORKERS", "auto") if executor == "local" else "auto"
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise RobustMatrixError(f"--workers must be 'auto' or a number of processes >= 1, got {value!r}")
    return int(value)


def _print_failures(failed: list[tuple[str, str]]) -> None:
    print(f"robustmatrix: {len(failed)} failure(s); everything else completed:", file=sys.stderr)
    for label, reason in failed:
        print(f"  {label}: {reason}", file=sys.stderr)
    print("re-run only these with --retry-failed", file=sys.stderr)


def _load_components() -> None:
    """Built-ins, then plugins; a broken plugin is named and skipped, the others still load."""
    from bench.foundation.plugins import load_builtins, load_plugins

    load_builtins()
    for failure in load_plugins():
        print(f"robustmatrix: error: {failure.message()}", file=sys.stderr)


def _with_plugin_models(spec):  # noqa: ANN001, ANN202 - MatrixSpec, imported lazily
    """The matrix with the plugins' models its ``defenses`` select (see ``with_models``)."""
    from bench.foundation.config import with_models
    from bench.foundation.plugins import PRETRAINED_MODELS

    return with_models(spec, PRETRAINED_MODELS)


def _declared_models(config: Path | None) -> dict:
    """Pretrained models by id: the plugins', then the matrix file's (which win)."""
    from bench.foundation.config import load_spec
    from bench.foundation.plugins import PRETRAINED_MODELS

    models = dict(PRETRAINED_MODELS)
    if config is not None:
        models.update(load_spec(config).pretrained)
    return models


def _check_dataset(name: str) -> None:
    from bench.foundation.data import DATASETS

    if name not in DATASETS:
        raise RobustMatrixError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")


def _cmd_list(args: argparse.Namespace) -> int:
    from bench.foundation.kwargs import is_wildcard
    from bench.foundation.registry import registry_for, unknown_id_message

    _check_dataset(args.dataset)
    kinds = [args.kind] if args.kind else ["defense", "attack"]
    registries = [registry_for(kind) for kind in kinds]
    models = _declared_models(args.config) if "defense" in kinds else {}
    for pattern in args.pattern:
        if any(registry.ids(pattern) for registry in registries) or fnmatch.filter(models, pattern):
            continue
        other = [k for k in ("defense", "attack") if k not in kinds and registry_for(k).ids(pattern)]
        if other:
            article = {"defense": "a", "attack": "an", "verifier": "a"}
            found = f"matches only {other[0]}s" if is_wildcard(pattern) else f"is {article[other[0]]} {other[0]}"
            raise RobustMatrixError(
                f"'{pattern}' {found}, not {article[args.kind]} {args.kind}; drop --kind {args.kind}"
            )
        raise RobustMatrixError(unknown_id_message(pattern))
    entries = []
    for registry in registries:
        entries += [registry.get(i).describe(args.dataset) for i in registry.ids(args.pattern) if i not in models]
    chosen = sorted({name for pattern in args.pattern for name in fnmatch.filter(models, pattern)})
    entries += [_describe_model(models[name], args.config) for name in chosen]
    if args.json:
        print(json.dumps(entries, indent=2, sort_keys=True))
        return EXIT_OK
    from tabulate import tabulate

    for kind in kinds:
        rows = [e for e in entries if e["kind"] == kind]
        if not rows and any(e["kind"] == "pretrained" for e in entries):
            continue  # only pretrained models matched: no empty tables above theirs
        if kind == "defense":
            table = [[e["id"], _threats(e["trained_against"]), _nature(e), e["source"], e["description"]] for e in rows]
            headers = ["defense", "trained against", "nature", "source", "description"]
        elif kind == "verifier":
            table = [[e["id"], ", ".join(e["norms"]), e["kwargs"] or "–", e["source"], e["description"]] for e in rows]
            headers = ["verifier", "norms", "kwargs", "source", "description"]
        else:
            table = [
                [
                    e["id"],
                    e["family"],
                    e["norm"],
                    e["applies_to"],
                    _budget(e["budget"]),
                    e["kwargs_from"],
                    e["source"],
                    e["description"],
                ]
                for e in rows
            ]
            headers = ["attack", "family", "norm", "applies to", "budget", "budget from", "source", "description"]
        print(tabulate(table, headers=headers, tablefmt="simple") + "\n")
    pretrained = [e for e in entries if e["kind"] == "pretrained"]
    if pretrained:
        table = [
            [
                e["id"],
                e["dataset"],
                e["architecture"],
                e["sha256"][:12],
                _threats(e["trained_against"]),
                e["declared_in"],
            ]
            for e in pretrained
        ]
        headers = ["pretrained model", "dataset", "architecture", "sha256", "trained against", "declared in"]
        print(tabulate(table, headers=headers, tablefmt="simple") + "\n")
    return EXIT_OK


def _describe_model(model, config: Path | None) -> dict:  # noqa: ANN001 - a PretrainedSpec
    """A pretrained model as ``list`` shows it: where it is declared, its digest and architecture."""
    return {
        "kind": "pretrained",
        "id": model.id,
        "dataset": model.dataset,
        "architecture": model.architecture,
        "sha256": model.sha256,
        "weights": model.weights,
        "trained_against": [{"norm": n, "eps": e, "attack": a} for n, e, a in model.trained_against],
        "clean_accuracy": model.clean_accuracy,
        "declared_in": model.distribution or str(config),
        "source": model.source,
    }


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
    words = [f"{k} {budget[k]}" for k in ("steps", "restarts", "queries") if budget.get(k) is not None]
    if budget.get("forwards") is not None:
        words.append(f"≤ {budget['forwards']}/{budget.get('backwards') or 0} passes")
    return ", ".join(words) or "–"


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def _check_folder(path: Path, what: str) -> None:
    """Fail before any work, not after the run, when ``path`` cannot be (created as) a writable folder."""
    if path.exists():
        if not path.is_dir():
            raise RobustMatrixError(f"{what} {path} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise RobustMatrixError(f"{what} {path} is not writable")
        return
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RobustMatrixError(f"cannot create {what} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RobustMatrixError(f"cannot create {what} {path}: {ancestor} is not writable")


def _check_database_path(path: Path) -> None:
    """A database to write: an existing file (its content is checked when it is opened) or a new
    file in a folder that exists or can be created."""
    if path.is_dir():
        raise RobustMatrixError(f"--db {path} is a directory; give a database file, like {path / 'robustmatrix.db'}")
    if not path.exists():
        try:
            _check_folder(path.parent, "folder")
        except RobustMatrixError as exc:
            raise RobustMatrixError(f"--db {path}: {exc}") from None


def _write_leaderboard(db_path: Path, out_dir: Path) -> list[Path]:
    from leaderboard.build import write_leaderboard

    with warnings.catch_warnings():
        # matplotlib warns about degenerate axes (a defense with no ok cell); the files are still right.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(matplotlib|leaderboard)(\.|$)")
        return write_leaderboard(db_path, out_dir)


def _matrix_of_last_run(db_path: Path):  # noqa: ANN202 - MatrixSpec, imported lazily
    """The matrix that built an existing leaderboard: `run --defense ID` adds a row to *that* table."""
    from bench.foundation.config import spec_from_mapping
    from bench.storage.store import Store

    if not db_path.exists():
        return None
    with Store.open_existing(db_path) as store:
        row = store.connection.execute("SELECT config FROM runs ORDER BY run_id DESC LIMIT 1").fetchone()
    if row is None:
        return None
    return spec_from_mapping(json.loads(row["config"]), f"the last run recorded in {db_path}")


def _cmd_run(args: argparse.Namespace) -> int:
    from bench.execution.launch import run_matrix
    from bench.execution.progress import Progress
    from bench.execution.shard import Shard
    from bench.foundation.config import load_spec

    default_root = _results_root(args)
    db_path = args.db or default_root / "robustmatrix.db"
    out_dir = args.out or default_root
    spec = load_spec(args.config, quick=args.quick, preset_name=args.preset)
    _check_database_path(db_path)
    _check_folder(out_dir, "--out")
    if args.defense and args.config is None:
        spec = _matrix_of_last_run(db_path) or spec
    spec = _with_plugin_models(spec)
    shard = Shard.parse(args.shard) if args.shard else None
    options = _execution_options(args)
    result = run_matrix(
        spec,
        db_path,
        options,
        data_dir=args.data_dir or spec.data_dir,
        download=spec.download and not args.no_download,
        retry_failed=args.retry_failed,
        only_defenses=args.defense,
        shard=shard,
        progress=Progress(enabled=not args.quiet),
        git_commit=_git_commit(),
    )
    summary = result.summary
    if shard is None and (
        summary.trained or summary.loaded or summary.computed or summary.skipped or not summary.failed
    ):
        written = _write_leaderboard(db_path, out_dir)
        print(written[0].read_text())
        where = f"leaderboard in {out_dir}/"
    elif shard is None:  # every job failed: the failures are the report, there is no table to build
        where = "no leaderboard: nothing completed"
    else:
        where = f"shard {shard}; merge the shards with `robustmatrix merge ... --into DB`"
    print(
        f"{summary.trained} defenses trained, {summary.computed} cells computed, {summary.skipped} already in "
        f"{db_path}{f' ({summary.loaded} pretrained models loaded)' if summary.loaded else ''}; {where}",
        file=sys.stderr,
    )
    if summary.failed:
        _print_failures(summary.failed)
        return EXIT_FAILED_CELLS
    return EXIT_OK


def _results_root(args: argparse.Namespace) -> Path:
    """Where a preset's results go by default: results/, or results/NAME/ for another preset."""
    name = "quick" if args.quick else args.preset or "default"
    return DEFAULT_RESULTS if name == "default" else DEFAULT_RESULTS / name


def _cmd_plan(args: argparse.Namespace) -> int:
    from bench.commands.plan import render, run_plan
    from bench.foundation.config import load_spec

    spec = load_spec(args.config, quick=args.quick, preset_name=args.preset)
    if args.cpus_per_task < 1:
        raise RobustMatrixError(f"--cpus-per-task must be at least 1, got {args.cpus_per_task}")
    db_path = args.db or _results_root(args) / "robustmatrix.db"
    if db_path.is_dir():
        raise RobustMatrixError(f"--db {db_path} is a directory; give a database file")
    plan = run_plan(
        spec,
        device_name=args.device,
        workers=_workers(args.workers, "local"),
        db_path=db_path if db_path.exists() else None,
        data_dir=args.data_dir,
        throughput=args.throughput,
        threads=args.cpus_per_task,
        cold=args.cold,
    )
    print(render(plan, cells=not args.summary))
    return EXIT_OK


def _cmd_merge(args: argparse.Namespace) -> int:
    from bench.storage.merge import merge_databases

    report = merge_databases(list(args.sources), args.into)
    print(f"merged {len(args.sources)} database(s) into {args.into}: {report.summary()}")
    if report.conflicts:
        print(f"robustmatrix: {len(report.conflicts)} conflict(s) kept as they were in {args.into}:", file=sys.stderr)
        for conflict in report.conflicts:
            print(f"  {conflict.describe()}", file=sys.stderr)
        return EXIT_FAILED_CELLS
    return EXIT_OK


def _cmd_nightly(args: argparse.Namespace) -> int:
    from bench.commands.nightly import record_and_report, require_previous
    from bench.execution.launch import run_matrix
    from bench.execution.progress import Progress
    from bench.foundation.config import load_spec
    from bench.storage.store import Store

    if not args.max_slowdown > 1:
        raise RobustMatrixError(f"--max-slowdown must be greater than 1, got {args.max_slowdown}")
    spec = _with_plugin_models(load_spec(args.config, quick=args.quick, preset_name=args.preset))
    _check_database_path(args.db)
    _check_folder(args.out, "--out")
    require_previous(args.db, args.baseline)
    result = run_matrix(
        spec,
        args.db,
        _execution_options(args),
        kind="nightly",
        data_dir=args.data_dir or spec.data_dir,
        download=spec.download and not args.no_download,
        retry_failed=args.retry_failed,
        progress=Progress(enabled=not args.quiet),
        git_commit=_git_commit(),
    )
    with Store.open_existing(args.db) as store:
        report, written = record_and_report(store, result.run_id, result.summary, args.out, args.max_slowdown)
    written += _write_leaderboard(args.db, args.out)
    print(written[0].read_text())
    print(f"nightly report: {', '.join(str(p) for p in written)}", file=sys.stderr)
    if result.summary.failed:
        _print_failures(result.summary.failed)
    if report["regressed"]:
        print("robustmatrix: nightly regressions: " + "; ".join(report["reasons"]), file=sys.stderr)
        return EXIT_FAILED_CELLS
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bench.commands.check import FAIL, check_attack, check_defense
    from bench.foundation.data import load_dataset
    from bench.foundation.device import resolve_device
    from bench.foundation.registry import ATTACKS, DEFENSES, unknown_id_message

    models = _declared_models(args.config)
    matrix = None
    if args.config is not None:
        from bench.foundation.config import load_spec

        matrix = load_spec(args.config)
    if args.id in models:
        from bench.commands.check_pretrained import check_pretrained

        model = models[args.id]
        spec = None
        dataset = args.dataset or (matrix.dataset if matrix else model.dataset)
        n_eval = args.n_eval or (matrix.n_eval if matrix else None)
        label = f"{model.id} (pretrained sha256:{model.sha256[:12]}, {model.distribution or args.config})"
    elif args.id in DEFENSES:
        spec, check = DEFENSES.get(args.id), check_defense
    elif args.id in ATTACKS:
        spec, check = ATTACKS.get(args.id), check_attack
    else:
        declared = f" (pretrained models declared: {', '.join(sorted(models))})" if models else ""
        raise RobustMatrixError(unknown_id_message(args.id) + declared)
    if spec is not None:
        dataset, label = args.dataset or "digits", f"{spec.id} ({spec.source})"
    _check_dataset(dataset)
    device = resolve_device(args.device)
    data_dir = args.data_dir or (matrix.data_dir if matrix else None)
    data = load_dataset(dataset, data_dir, matrix.download if matrix else True)
    findings = (
        check(spec, data, device, args.seed) if spec is not None else check_pretrained(model, data, device, n_eval)
    )
    failed = [f for f in findings if f.status == FAIL]
    if args.json:
        print(json.dumps([vars(f) for f in findings], indent=2))
    else:
        print(f"robustmatrix check {label} on {dataset}:")
        print(tabulate([[f.status.upper(), f.check, f.evidence] for f in findings], tablefmt="plain"))
        warnings = sum(f.status == "warn" for f in findings)
        verdict = "FAILED" if failed else "passed"
        print(f"\n{verdict}: {len(failed)} failure(s), {warnings} warning(s), {len(findings)} checks")
    return EXIT_FAILED_CELLS if failed else EXIT_OK


def _cmd_new_defense(args: argparse.Namespace) -> int:
    from bench.commands.scaffold import new_defense

    root = new_defense(args.name, args.dir)
    print(f"wrote {root}/: install it with `pip install {root}`, then `robustmatrix check {args.name}-v1`")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from bench.commands.export import export_defense

    if not args.db.is_file():
        raise RobustMatrixError(f"database {args.db} does not exist")
    weights, toml = export_defense(args.db, args.id, args.out, args.seed)
    print(toml.read_text(), end="")
    print(f"wrote {weights} and {toml}", file=sys.stderr)
    return EXIT_OK


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    _check_folder(args.out, "--out")
    written = _write_leaderboard(args.db, args.out)
    print("\n".join(str(p) for p in written))
    return EXIT_OK


COMMANDS = {
    "list": _cmd_list,
    "run": _cmd_run,
    "plan": _cmd_plan,
    "check": _cmd_check,
    "new-defense": _cmd_new_defense,
    "merge": _cmd_merge,
    "nightly": _cmd_nightly,
    "leaderboard": _cmd_leaderboard,
    "export": _cmd_export,
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, like Ctrl-C: Python's default would end the process at
    once, leaving its run marked ``running`` and its workers without a driver."""


def _terminated(signum: int, frame: object) -> NoReturn:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if on_main_thread else None
    try:
        return _main(argv)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = _build_parser().parse_args(argv)
        if args.command not in ("leaderboard", "merge", "new-defense"):
            _load_components()
        return COMMANDS[args.command](args)
    except RobustMatrixError as exc:
        print(f"robustmatrix: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # output piped into a reader that stopped early (`| head`): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt as exc:
        why = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"robustmatrix: {why}; finished cells are saved, run the same command to resume", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
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
