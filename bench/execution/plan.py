"""The cost plan of a matrix, before anything runs: every training, evaluation and cell with the
forward and backward passes the harness will count for it, what the database already holds, and a
time estimate from throughput measured on this device (or given by the user).

Passes are per example, as :mod:`bench.foundation.counting` counts them. A training's passes are
exact: the defense's own ``fit`` is run for one epoch on a few random examples of the matrix's
shape and scaled by epochs and training-set size (every defense's cost is the same each epoch). A
cell's passes are its attack's declared bound (``max_passes_per_example``) times the examples it
attacks: the clean-correct ones from the stored evaluation, else ``ASSUMED_CLEAN_ACCURACY`` of
``n_eval``; the cascade attacks only what its members left robust, ``ASSUMED_SURVIVORS`` of them.
A minimum-norm attack runs once per defense for all its eps cells (each cell records the shared
run's passes; the plan counts them once). Early-stopping attacks stop before their bound on broken
examples, so cell passes are an upper bound; the time estimate corrects for that, per attack
family, with ``BOUND_USED`` (measured on the default matrix, see docs/operations.md).
"""

from __future__ import annotations

import heapq
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bench.execution.jobs import CellJob, TrainingJob
from bench.execution.probes import PROBE_EXAMPLES
from bench.execution.runner import Runner
from bench.foundation.config import MatrixSpec
from bench.foundation.counting import PassCounter
from bench.foundation.data import DATASET_SHAPES, DatasetShape, load_dataset
from bench.foundation.errors import RobustMatrixError
from bench.foundation.models import architecture_name, build_model
from bench.foundation.registry import ATTACKS, DEFENSES
from bench.storage.store import Store, checkpoint_dir, decode_mask, encode_mask
from defenses.base import TrainContext, TrainData

ASSUMED_CLEAN_ACCURACY = 0.95
"""Fraction of ``n_eval`` a defense classifies correctly (and every cell attacks) where the database
has no evaluation of it yet: the default matrix's defenses average 0.91 (0.73-0.98)."""

ASSUMED_SURVIVORS = 0.35
"""Fraction of the clean-correct examples still robust after every other cell of the defense at the
cascade's norm and eps: the cascade's stages attack only those. The default matrix's per-example
worst cases are 0.18-0.39 of ``n_eval``, higher at small eps."""

BOUND_USED: Mapping[str, float] = {
    "gradient": 0.75,
    "adaptive": 0.75,
    "transfer": 0.8,
    "score-based": 0.7,
    "noise": 1.05,
    "decision-based": 3.3,
    "cascade": 0.75,
}
"""A cell's seconds over what its declared pass bound would take at the calibrated throughput, per
attack family. Two effects meet in it: attacks stop early on broken examples (fewer passes than the
bound), and a real attack's pass costs more than a calibration's (projections, losses, shrinking
batches, the per-batch checks; ART's numpy for HopSkipJump, hence decision-based's 3.3). Their
ratios were measured on 279 cells of the digits matrix (3 defenses), their scale fitted so the
default matrix's plan matches its measured cold run (650 s on 2 workers): docs/operations.md, "The
cost plan". An unknown family is taken at 1."""

PROBE_EXAMPLES_TRAINING = 4
CALIBRATION_SECONDS = 1.0
"""Wall time each timed pass kind gets in the calibration (a few per architecture)."""


@dataclass(frozen=True)
class Throughput:
    """Examples per second through one architecture on one device, per kind of pass: forward only
    (queries, predictions), forward and backward to the input with frozen weights (an attack step),
    and a training step (forward, backward to the weights, optimiser update)."""

    forward: float
    gradient: float
    training: float
    source: str

    @classmethod
    def given(cls, passes_per_second: float) -> Throughput:
        """``--throughput N``: N example-passes per second, a forward and a backward one pass each."""
        if not (math.isfinite(passes_per_second) and passes_per_second > 0):
            raise RobustMatrixError(
                f"--throughput must be a positive number of passes per second, got {passes_per_second}"
            )
        n = float(passes_per_second)
        return cls(n, n / 2, n / 2, f"given: {n:g} passes/s")

    def seconds(self, forwards: int, backwards: int, training_steps: int = 0) -> float:
        """Time of ``forwards`` and ``backwards`` passes, ``training_steps`` of the backwards being
        weight updates (each backward pass comes with its forward)."""
        gradient = max(0, backwards - training_steps)
        return max(0, forwards - backwards) / self.forward + gradient / self.gradient + training_steps / self.training


@dataclass(frozen=True)
class TrainingPlan:
    defense_id: str
    seed: int
    architecture: str
    epochs: int
    forwards: int
    backwards: int
    steps: int
    """Examples through a weight update (epochs x training-set size)."""
    cached: bool
    seconds: float


@dataclass(frozen=True)
class CellPlan:
    defense_id: str
    seed: int
    attack_id: str
    norm: str
    eps: float
    examples: int
    forwards: int | None
    """None: the attack declares no bound."""
    backwards: int | None
    cached: bool
    shared: bool
    """A minimum-norm attack's eps cell after its first: the run is shared, counted once."""
    seconds: float
    ready_after: str
    """The training key it waits for."""


@dataclass(frozen=True)
class MatrixPlan:
    dataset: str
    device: str
    workers: int
    trainings: tuple[TrainingPlan, ...]
    evaluations: tuple[tuple[str, float, bool], ...]
    """(training key, seconds, cached) per clean evaluation."""
    cells: tuple[CellPlan, ...]
    throughput: Mapping[str, Throughput]
    overhead: float
    """Seconds per job the harness spends besides the passes (loading, checks, the scheduler)."""
    startup: float
    assumptions: tuple[str, ...] = field(default_factory=tuple)

    @property
    def passes(self) -> int:
        training = sum(t.forwards + t.backwards for t in self.trainings if not t.cached)
        cells = sum((c.forwards or 0) + (c.backwards or 0) for c in self.cells if not (c.cached or c.shared))
        return training + cells

    @property
    def work_seconds(self) -> float:
        return (
            sum(t.seconds for t in self.trainings)
            + sum(s for _, s, _ in self.evaluations)
            + sum(c.seconds for c in self.cells)
        )

    def wall_seconds(self) -> tuple[float, str]:
        """(estimated wall time on ``workers`` workers, the longest pole), by replaying the runner's
        schedule: trainings longest first, each defense's evaluation and cells once its training is
        done, every job to the first worker free."""
        free = [self.startup] * self.workers
        heapq.heapify(free)
        done: dict[str, float] = {}
        pole, pole_seconds = "nothing to run", 0.0
        for training in sorted(self.trainings, key=lambda t: -t.seconds):
            start = heapq.heappop(free)
            done[training.defense_id + str(training.seed)] = start + training.seconds
            heapq.heappush(free, start + training.seconds)
            if training.seconds > pole_seconds:
                pole, pole_seconds = f"training {training.defense_id}", training.seconds
        keys = {(t.defense_id, t.seed): done[t.defense_id + str(t.seed)] for t in self.trainings}
        jobs = sorted(
            ((keys.get((c.defense_id, c.seed), self.startup), c.seconds, c) for c in self.cells if c.seconds > 0),
            key=lambda job: job[0],
        )
        end = max(free) if free else 0.0
        for at, seconds, cell in jobs:
            start = max(heapq.heappop(free), at)
            heapq.heappush(free, start + seconds)
            end = max(end, start + seconds)
            if seconds > pole_seconds:
                pole, pole_seconds = f"cell {cell.defense_id} x {cell.attack_id} @ {cell.eps:g}", seconds
        evaluation = sum(s for _, s, _ in self.evaluations) / max(1, self.workers)
        return max(end, max(free)) + evaluation, f"{pole} ({pole_seconds:.0f} s)"


# ------------------------------------------------------------------------------------ data shape


class DeclaredData:
    """Stands in for a dataset whose files are absent: its declared sizes, no fingerprint (the plan
    then cannot look results up in a database, and says so)."""

    def __init__(self, name: str, shape: DatasetShape) -> None:
        self.name = name
        self.shape = shape

    def fingerprint(self) -> str:
        return "data-not-loaded"

    def has_train(self) -> bool:
        """Planned as declared: with its training split (a run without one says so when it starts)."""
        return True

    def eval_indices(self, n: int) -> torch.Tensor:
        if n > self.shape.test:
            raise RobustMatrixError(f"n_eval = {n} but {self.name} has only {self.shape.test} test examples")
        return torch.arange(n)


def dataset_shape(name: str) -> DatasetShape:
    if name not in DATASET_SHAPES:
        raise RobustMatrixError(f"unknown dataset '{name}'; choose one of {', '.join(DATASET_SHAPES)}")
    return DATASET_SHAPES[name]


# ------------------------------------------------------------------------------ training passes


def _probe_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The kwargs with every epoch count at 1 (None ones follow ``epochs``)."""
    return {
        k: (1 if k.endswith("epochs") and isinstance(v, int) and not isinstance(v, bool) else v)
        for k, v in kwargs.items()
    }


def epochs_run(kwargs: Mapping[str, Any]) -> int:
    """Epochs a training runs in all, as its defense reports them: every ``*epochs`` kwarg (a
    distilled student's teacher too; None follows ``epochs``)."""
    total = 0
    for name, value in kwargs.items():
        if name.endswith("epochs"):
            if value is None:
                value = kwargs.get("epochs", 0)
            if isinstance(value, int) and not isinstance(value, bool):
                total += value
    return total


def training_passes(
    defense_id: str, dataset: str, kwargs: Mapping[str, Any], shape: DatasetShape
) -> tuple[int, int, int]:
    """(forwards, backwards, epochs) of training ``defense_id`` with ``kwargs`` on the full training
    set: its ``fit`` run for one epoch on a few random examples, counted, and scaled (exact for every
    defense whose cost per example is the same each epoch — all built-in ones)."""
    spec = DEFENSES.get(defense_id)
    if spec.source.startswith("pretrained"):
        return 0, 0, 0
    probe = _probe_kwargs(kwargs)
    defense = spec.make(dataset, probe)
    generator = torch.Generator().manual_seed(0)
    n = PROBE_EXAMPLES_TRAINING
    x = torch.rand((n, *shape.image_shape), generator=generator)
    y = torch.arange(n) % shape.num_classes
    counter = PassCounter()
    epochs = [0]

    def on_epoch(epoch: int, total: int, loss: float) -> None:
        epochs[0] = max(epochs[0], epoch)

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = defense.build_model(build_model(dataset, shape.image_shape, shape.num_classes))
        defense.fit(
            model, TrainData(x, y, shape.num_classes, dataset), TrainContext(torch.device("cpu"), 0, counter, on_epoch)
        )
    finally:
        torch.random.set_rng_state(state)
    probed = max(1, epochs[0])
    total_epochs = epochs_run(kwargs) or probed
    scale = shape.train * total_epochs / (n * probed)
    return round(counter.forwards * scale), round(counter.backwards * scale), total_epochs


# ----------------------------------------------------------------------------------- calibration


def _timed(
    step: Callable[[], None], seconds: float, blocks: int = 16, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Seconds per call of ``step`` by ``clock``: the fastest of ``blocks`` timed blocks of about
    ``seconds / blocks`` each, after one warm-up call. The fastest, because other work on the device
    only ever slows a block down: it is the device's own speed, which an unloaded run gets."""
    step()
    best = math.inf
    for _ in range(blocks):
        calls, start = 0, clock()
        while True:
            step()
            calls += 1
            elapsed = clock() - start
            if elapsed >= seconds / blocks or calls >= 100:
                break
        best = min(best, elapsed / calls)
    return best


def measure_throughput(
    model: nn.Module,
    image_shape: tuple[int, int, int],
    num_classes: int,
    device: torch.device,
    attack_batch: int,
    training_batch: int,
    threads: int = 1,
    seconds: float = CALIBRATION_SECONDS,
) -> Throughput:
    """Time the three kinds of pass of ``model`` on ``device`` at the batch sizes the matrix uses
    (smaller where one pass would take over a tenth of a second: the rate per example is then
    already reached), with ``threads`` torch threads as each job gets."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    # On the CPU the process's own CPU time: other processes sharing the cores (a busy machine) then
    # do not lower the measured speed. A GPU works asynchronously: wall time, synchronised.
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    try:
        model = model.to(device)

        def batch_for(wanted: int) -> int:
            trial = torch.rand((min(8, wanted), *image_shape), device=device)
            model.eval()
            with torch.no_grad():
                per = _timed(lambda: model(trial), 0.05, clock=clock) / len(trial)
            return max(1, min(wanted, int(0.1 / max(per, 1e-9))))

        def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.rand((batch, *image_shape), device=device), torch.arange(batch, device=device) % num_classes

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        a = batch_for(attack_batch)
        x, y = inputs(a)
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)

        def forward() -> None:
            with torch.no_grad():
                model(x)
            sync()

        def gradient() -> None:
            inp = x.clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(inp), y, reduction="sum"), inp)
            sync()

        forward_rate = a / _timed(forward, seconds, clock=clock)
        gradient_rate = a / _timed(gradient, seconds, clock=clock)
        t = batch_for(training_batch)
        xt, yt = inputs(t)
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

        def training() -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(xt), yt).backward()
            optimizer.step()
            sync()

        training_rate = t / _timed(training, seconds, clock=clock)
    finally:
        torch.set_num_threads(previous)
    where = f"{device.type}, {threads} thread{'s' if threads > 1 else ''}"
    return Throughput(forward_rate, gradient_rate, training_rate, f"measured ({where}, batches {a}/{t})")


# ------------------------------------------------------------------------------------------ plan


PER_JOB_OVERHEAD = 0.02
"""Seconds the harness spends per computed job besides its passes on a CPU: building the attack,
checking every batch, storing the record, the scheduler (measured on the default matrix)."""
STARTUP_SECONDS = 5.0
"""Starting the command and its workers, loading data and components."""


def plan_matrix(
    spec: MatrixSpec,
    *,
    device: torch.device,
    workers: int,
    db_path: Path | None,
    data_dir: str | None = None,
    throughput: float | None = None,
    threads: int = 1,
    environment: Mapping[str, Any] | None = None,
    cold: bool = False,
) -> MatrixPlan:
    """The plan of ``spec``: what a run on ``workers`` workers of ``device`` would compute, with
        passes and seconds, and what ``db_path`` already holds (looked up only where the dataset's files
        are here: keys hold a digest of the data). ``cold``: cost everything as if nothing were stored,
    still reading the stored evaluations (which attacks pair, how many examples are clean-correct)."""
    shape = dataset_shape(spec.dataset)
    assumptions: list[str] = []
    try:
        data: Any = load_dataset(spec.dataset, data_dir or spec.data_dir, download=False)
        loaded = True
    except RobustMatrixError:
        data, loaded = DeclaredData(spec.dataset, shape), False
        assumptions.append(f"{spec.dataset}'s files are not here: sizes as declared, the database not consulted")
    runner = Runner(spec, data, None)
    if environment is not None:
        runner.environment = dict(environment)
    store = Store.open_existing(db_path) if (loaded and db_path is not None and db_path.is_file()) else None
    try:
        return _plan(spec, runner, shape, device, workers, store, throughput, threads, assumptions, cold)
    finally:
        if store is not None:
            store.close()


def _plan(
    spec: MatrixSpec,
    runner: Runner,
    shape: DatasetShape,
    device: torch.device,
    workers: int,
    store: Store | None,
    given: float | None,
    threads: int,
    assumptions: list[str],
    cold: bool = False,
) -> MatrixPlan:
    defenses = runner.defenses
    surrogates: dict[int, TrainingJob] = {}
    if any(a.needs_surrogate for a in runner.attacks):
        standard = DEFENSES.get("standard-v1")
        surrogates = {seed: runner.training_job(standard, seed) for seed in spec.seeds}  # type: ignore[arg-type]
    jobs = [runner.training_job(d, seed) for seed in spec.seeds for d in defenses]  # type: ignore[arg-type]
    needed = list({job.training_key: job for job in [*surrogates.values(), *jobs]}.values())
    rates: dict[str, Throughput] = {}

    def rate(architecture: str, training_batch: int) -> Throughput:
        if given is not None:
            return rates.setdefault(architecture, Throughput.given(given))
        if architecture not in rates:
            model = build_model(spec.dataset, shape.image_shape, shape.num_classes)
            attack_batch = min(spec.batch_size, spec.n_eval)
            rates[architecture] = measure_throughput(
                model, shape.image_shape, shape.num_classes, device, attack_batch, training_batch, threads
            )
        return rates[architecture]

    architecture = architecture_name(spec.dataset)
    trainings = []
    for job in needed:
        forwards, backwards, epochs = training_passes(job.defense_id, spec.dataset, job.kwargs, shape)
        steps = epochs * shape.train if forwards else 0
        cached = not cold and _training_cached(store, job)
        throughput = rate(architecture, int(job.kwargs.get("batch_size", 64) or 64))
        seconds = 0.0 if cached or not forwards else throughput.seconds(forwards, backwards, steps)
        trainings.append(
            TrainingPlan(job.defense_id, job.seed, architecture, epochs, forwards, backwards, steps, cached, seconds)
        )
    throughput = rate(architecture, 64)
    evaluations, cells = [], []
    observed_note = False
    for job in jobs:
        evaluation_job = runner.evaluation_job(job)
        row = store.evaluation(evaluation_job.eval_key) if store is not None else None
        if row is None:
            observed_note = True
            clean = round(spec.n_eval * ASSUMED_CLEAN_ACCURACY)
            mask = encode_mask([i < clean for i in range(spec.n_eval)])
            evaluation: Mapping[str, Any] = {"observed": json.dumps(_assumed_observation(job)), "clean_mask": mask}
            probe = min(PROBE_EXAMPLES, spec.n_eval)
            seconds = throughput.seconds(spec.n_eval + 4 * probe, 2 * probe) + PER_JOB_OVERHEAD
            evaluations.append((job.training_key, seconds, False))
        else:
            evaluation = row
            clean = int(decode_mask(row["clean_mask"], spec.n_eval).sum())
            seconds = throughput.seconds(spec.n_eval + 4 * PROBE_EXAMPLES, 2 * PROBE_EXAMPLES) + PER_JOB_OVERHEAD
            evaluations.append((job.training_key, seconds if cold else 0.0, not cold))
        cell_jobs = runner.cell_jobs(job, evaluation, surrogates)
        status = store.cell_status([c.cell_key for c in cell_jobs]) if store is not None and not cold else {}
        cells += _cell_plans(spec, job, cell_jobs, clean, status, throughput)
    if observed_note:
        assumptions.append(
            f"defenses without a stored evaluation: {ASSUMED_CLEAN_ACCURACY:.0%} of n_eval clean-correct, "
            "adaptive attacks paired by declared nature (a non-differentiable one observed with vanishing gradients)"
        )
    if spec.training_precision != "fp32":
        assumptions.append(f"training throughput measured in fp32, not {spec.training_precision}")
    assumptions.append(
        f"the cascade's stages attack {ASSUMED_SURVIVORS:.0%} of the clean-correct examples "
        "(what its members left robust)"
    )
    assumptions.append(
        "cell passes are declared bounds; their time is scaled per attack family by BOUND_USED "
        f"(early stops; measured on digits), plus {PER_JOB_OVERHEAD:g} s per job"
    )
    return MatrixPlan(
        dataset=spec.dataset,
        device=str(device),
        workers=workers,
        trainings=tuple(trainings),
        evaluations=tuple(evaluations),
        cells=tuple(cells),
        throughput=dict(rates),
        overhead=PER_JOB_OVERHEAD,
        startup=STARTUP_SECONDS,
        assumptions=tuple(assumptions),
    )


def _assumed_observation(job: TrainingJob) -> dict[str, Any]:
    """What the evaluation will likely observe: a declared non-differentiable defense's input
    gradients vanish (that is why it declares it), which also pairs it with the logit-loss attacks."""
    if DEFENSES.get(job.defense_id).differentiable:
        return {}
    return {"vanishing_gradient_ce": 1.0, "vanishing_gradient_dlr": 1.0}


def _training_cached(store: Store | None, job: TrainingJob) -> bool:
    if store is None or store.training(job.training_key) is None:
        return False
    return (checkpoint_dir(store.path) / job.checkpoint).exists()


def _cell_plans(
    spec: MatrixSpec,
    training: TrainingJob,
    jobs: list[CellJob],
    clean: int,
    status: Mapping[str, str],
    throughput: Throughput,
) -> list[CellPlan]:
    plans = []
    minimal_runs: set[str] = set()
    for job in jobs:
        attack = ATTACKS.get(job.attack_id).make(spec.dataset, job.attack_kwargs, eps=job.eps)
        bound = getattr(attack, "max_passes_per_example", lambda: None)()
        examples = clean if job.members is None else round(clean * ASSUMED_SURVIVORS)
        used = BOUND_USED.get("cascade" if job.members is not None else job.family, 1.0)
        shared = False
        if not job.bounded:
            shared = job.attack_id in minimal_runs
            minimal_runs.add(job.attack_id)
        cached = status.get(job.cell_key) in ("ok", "failed")
        forwards = int(bound[0]) * examples if bound is not None else None
        backwards = int(bound[1]) * examples if bound is not None else None
        if cached or shared or forwards is None:
            seconds = 0.0 if cached or shared else PER_JOB_OVERHEAD
        else:
            seconds = used * throughput.seconds(forwards, backwards or 0) + PER_JOB_OVERHEAD
        plans.append(
            CellPlan(
                training.defense_id,
                training.seed,
                job.attack_id,
                job.norm,
                job.eps,
                examples,
                forwards,
                backwards,
                cached,
                shared,
                seconds,
                training.training_key,
            )
        )
    return plans
