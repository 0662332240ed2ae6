"""``robustmatrix plan``: its pass counts are the ones a run records, it knows what the database
holds, its presets validate without their data, and bad input is one line. (Its time estimate
against a measured run is a speed figure: tests/perf/test_plan_accuracy.py.)"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import replace

import pytest
import torch

from bench.execution.plan import (
    DeclaredData,
    MatrixPlan,
    Throughput,
    TrainingPlan,
    dataset_shape,
    plan_matrix,
    training_passes,
)
from bench.execution.runner import Runner
from bench.foundation.config import load_spec, preset
from bench.foundation.data import DATASET_SHAPES
from bench.foundation.registry import DEFENSES
from tests.conftest import run_cli, write_matrix

# Attacks whose passes never stop early, so the declared bound is what a run counts: FGSM, CW
# (a minimum-norm run shared by its eps cells) and transfer PGD (its surrogate's passes included).
EXACT_MATRIX = """
dataset = "digits"
defenses = ["standard-v1", "pgd-at-linf-v1"]
attacks = ["fgsm-linf-v1", "cw-l2-v1", "transfer-pgd-linf-v1"]
n_eval = 40
[eps]
linf = [0.2]
l2 = [0.75, 1.5]
[defense_kwargs."*"]
epochs = 1
[attack_kwargs."cw-l2-v1"]
search_steps = 2
steps = 10
"""


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan")
    matrix = write_matrix(folder / "matrix.toml", EXACT_MATRIX)
    db = folder / "robustmatrix.db"
    result = run_cli("run", "--config", str(matrix), "--db", str(db), "--out", str(folder / "out"), "--quiet")
    assert result.code == 0, result.stderr
    return load_spec(matrix), db


def _plan(spec, db, **kwargs):
    return plan_matrix(spec, device=torch.device("cpu"), workers=1, db_path=db, throughput=1e4, **kwargs)


def test_training_passes_are_the_ones_a_run_records(exact_run):
    spec, db = exact_run
    plan = _plan(spec, db, cold=True)
    with sqlite3.connect(db) as connection:
        recorded = {
            row[0]: row[1:] for row in connection.execute("SELECT defense_id, forwards, backwards FROM trainings")
        }
    assert {t.defense_id: (t.forwards, t.backwards) for t in plan.trainings} == recorded
    assert all(not t.cached and t.seconds > 0 for t in plan.trainings)


def test_cell_passes_are_the_ones_a_run_records(exact_run):
    """With the stored evaluations (the clean-correct count), an attack that never stops early is
    planned at exactly the passes the run counted; the eps cells of a minimum-norm attack record the
    shared run's passes each, and the plan counts that run once."""
    spec, db = exact_run
    plan = _plan(spec, db, cold=True)
    with sqlite3.connect(db) as connection:
        recorded = {
            (row[0], row[1], row[2]): row[3:]
            for row in connection.execute("SELECT defense_id, attack_id, eps, forwards, backwards FROM cells")
        }
    assert len(plan.cells) == len(recorded) == 2 * (1 + 2 + 1)
    for cell in plan.cells:
        forwards, backwards = recorded[(cell.defense_id, cell.attack_id, cell.eps)]
        if cell.shared:
            assert cell.attack_id == "cw-l2-v1" and cell.seconds == 0
            first = next(c for c in plan.cells if c.defense_id == cell.defense_id and c.attack_id == cell.attack_id)
            assert (first.forwards, first.backwards) == (forwards, backwards)
        else:
            assert (cell.forwards, cell.backwards) == (forwards, backwards), cell
    assert sum(c.shared for c in plan.cells) == 2


def test_stored_results_are_shown_as_cached_and_cost_nothing(exact_run):
    spec, db = exact_run
    cached = _plan(spec, db)
    assert all(t.cached and t.seconds == 0 for t in cached.trainings)
    assert all(c.cached and c.seconds == 0 for c in cached.cells)
    assert cached.passes == 0
    fresh = _plan(spec, None)
    assert not any(c.cached for c in fresh.cells) and fresh.passes > 0


def test_training_passes_scale_with_epochs_and_data():
    """One probed epoch, scaled: PGD-AT's 7 steps cost 9 forwards and 8 backwards per example and
    epoch (7 steps, the training pass, one start), the teacher of a distilled model counts."""
    shape = dataset_shape("digits")
    spec = DEFENSES.get("pgd-at-linf-v1")
    forwards, backwards, epochs = training_passes(spec.id, "digits", spec.resolve_kwargs("digits"), shape)
    assert (forwards, backwards, epochs) == (20 * 1347 * 9, 20 * 1347 * 8, 20)
    distilled = DEFENSES.get("distillation-v1")
    kwargs = distilled.resolve_kwargs("digits", {"epochs": 3})
    assert training_passes(distilled.id, "digits", kwargs, shape)[2] == 6


def test_declared_shapes_are_the_loaded_ones(digits):
    shape = DATASET_SHAPES["digits"]
    assert (shape.train, shape.test, shape.image_shape, shape.num_classes) == (
        len(digits.y_train),
        len(digits.y_test),
        digits.image_shape,
        digits.num_classes,
    )


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_presets_validate_without_their_data(name):
    """Every id resolves, every kwarg and eps is accepted by the component it names, and every
    adversarially trained defense has grid radii inside the ball it was trained for (its seen cells)."""
    spec = preset(name)
    runner = Runner(spec, DeclaredData(spec.dataset, dataset_shape(spec.dataset)), None)
    assert len(runner.defenses) == len(DEFENSES.select(["*"])) and runner.attacks
    published = {"mnist": {"linf": 0.3, "l2": 2.0, "l1": 10.0}, "cifar10": {"linf": 8 / 255, "l2": 0.5}}[name]
    for norm, eps in published.items():
        assert any(math.isclose(e, eps) for e in spec.eps[norm]), (norm, spec.eps)
    for defense in runner.defenses:
        for threat in defense.threat_models(runner.training_job(defense, 0).kwargs):
            assert any(e <= threat.eps + 1e-12 for e in spec.eps[threat.norm]), (defense.id, threat)


def test_wall_time_replays_the_schedule():
    """Two workers: the two trainings in parallel, then the cells on whichever worker is free."""
    throughput = Throughput.given(100.0)
    assert throughput.seconds(forwards=100, backwards=0) == 1.0
    assert throughput.seconds(forwards=100, backwards=100, training_steps=100) == 2.0
    trainings = tuple(TrainingPlan(d, 0, "a", 1, 1, 1, 1, False, s) for d, s in (("a-v1", 10.0), ("b-v1", 4.0)))
    plan = MatrixPlan("digits", "cpu", 2, trainings, (), (), {"a": throughput}, 0.0, 0.0)
    assert plan.wall_seconds()[0] == 10.0
    assert replace(plan, workers=1).wall_seconds()[0] == 14.0


def test_plan_prints_passes_and_a_time_estimate(tmp_path):
    """The MNIST preset (a part of it: the test stays fast), its data absent, at a given throughput."""
    matrix = write_matrix(tmp_path / "m.toml", 'defenses = ["pgd-at-linf-v1"]\nattacks = ["pgd-linf-v1", "cw-l2-v1"]\n')
    args = ["--preset", "mnist", "--config", str(matrix), "--throughput", "50000", "--db", str(tmp_path / "x.db")]
    result = run_cli("plan", *args)
    assert result.code == 0, result.stderr
    assert "pgd-at-linf-v1" in result.stdout and "small-cnn-w32" in result.stdout
    assert "estimated:" in result.stdout and "wall on" in result.stdout
    assert "given: 50000 passes/s" in result.stdout
    assert "cw-l2-v1" in result.stdout and "one run for every eps" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--throughput", "-5"], "--throughput"),
        (["--preset", "imagenet"], "invalid choice"),
        (["--device", "tpu"], "bad device"),
        (["--quick", "--preset", "mnist"], "--quick"),
        (["--workers", "0"], "--workers"),
    ],
)
def test_bad_input_is_one_line(args, fragment):
    result = run_cli("plan", *args)
    assert result.code == 2, (result.code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("robustmatrix: error:") and fragment in lines[0], result.stderr
