"""Faults cost only what they break: a defense that cannot train or be evaluated loses its own cells,
a cell that raises, produces NaN/inf or runs past its time budget is recorded as failed with its
reason, everything else completes, the run exits 1 with a summary, and --retry-failed re-runs only
the failures. Editing a component's code re-runs its cells and nobody else's."""

from __future__ import annotations

import re
import sqlite3

from bench.foundation.registry import ATTACKS
from tests.components import HEADER, components
from tests.conftest import run_cli, write_matrix

TRAIN_STANDARD = "train(model, data, ctx, lambda m, x, y, epoch: F.cross_entropy(m(x), y), **self.train_kwargs)"

BROKEN_DEFENSE = (
    HEADER
    + """
@register_defense("broken-v1", kwargs=KWARGS, dataset_kwargs=DATASET_KWARGS, description="cannot be trained")
class Broken(Defense):
    def __init__(self, **kwargs):
        self.train_kwargs = training_kwargs(kwargs)

    def fit(self, model, data, ctx):
        raise RuntimeError("deliberately broken defense")
"""
)


def _matrix(tmp_path, defenses, attacks, extra=""):
    return write_matrix(
        tmp_path / "matrix.toml",
        f"""
dataset = "digits"
defenses = {defenses!r}
attacks = {attacks!r}
n_eval = 60
{extra}
[eps]
linf = [0.1, 0.3]
[defense_kwargs."*"]
epochs = 2
""".replace("'", '"'),
    )


def _rows(db, sql):
    connection = sqlite3.connect(db)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def _computed(stderr: str) -> tuple[int, int]:
    match = re.search(r"(\d+) defenses trained, (\d+) cells computed", stderr)
    assert match, stderr
    return int(match.group(1)), int(match.group(2))


def test_a_defense_that_cannot_train_costs_only_its_own_cells(tmp_path):
    with components(tmp_path / "mods", BROKEN_DEFENSE) as module:
        config = _matrix(tmp_path, ["standard-v1", "broken-v1"], ["fgsm-linf-v1"])
        db = tmp_path / "results" / "robustmatrix.db"
        first = run_cli("run", "--config", str(config), "--quiet", cwd=tmp_path)
        assert first.code == 1, first.stderr
        assert "broken-v1 (seed 0): none of its cells ran: training failed: RuntimeError: deliberately broken" in (
            first.stderr
        )
        assert "re-run only these with --retry-failed" in first.stderr
        cells = _rows(db, "SELECT defense_id, status FROM cells")
        assert sorted(cells) == [("standard-v1", "ok"), ("standard-v1", "ok")]
        assert _rows(db, "SELECT kind, defense_id FROM failures") == [("training", "broken-v1")]
        assert "standard-v1" in (tmp_path / "results" / "leaderboard.md").read_text()

        again = run_cli("run", "--config", str(config), "--quiet", cwd=tmp_path)
        assert again.code == 1 and _computed(again.stderr) == (0, 0)
        assert "deliberately broken" in again.stderr, "a recorded failure is reported until it is fixed"

        retried = run_cli("run", "--config", str(config), "--quiet", "--retry-failed", cwd=tmp_path)
        assert retried.code == 1 and _computed(retried.stderr) == (0, 0), "retrying trains it again; it fails again"

        module.write(BROKEN_DEFENSE.replace('raise RuntimeError("deliberately broken defense")', TRAIN_STANDARD))
        fixed = run_cli("run", "--config", str(config), "--quiet", cwd=tmp_path)
        assert fixed.code == 0, fixed.stderr
        assert _computed(fixed.stderr) == (1, 2), "fixed code is a new version: trained, and its cells run"
        assert len(_rows(db, "SELECT 1 FROM cells WHERE status = 'ok'")) == 4


FAULTY = (
    HEADER
    + '''
@register_attack("raising-linf-v1", family="gradient", norm="linf", budget_defaults=Budget(steps=1, restarts=1))
class Raising(Attack):
    def generate(self, victim, x, y):
        raise ValueError("deliberately raising attack")


class NaNAttack:
    """Not an Attack subclass: nothing checks its output but the workbench."""

    def __init__(self, eps):
        self.eps = eps

    def __call__(self, victim, x, y):
        return x * float("nan")


register_attack("nan-linf-v1", family="gradient", norm="linf", budget_defaults=Budget(steps=1, restarts=1))(NaNAttack)


@register_attack("stuck-linf-v1", family="gradient", norm="linf", budget_defaults=Budget(steps=1, restarts=1))
class Stuck(Attack):
    """Never leaves its first batch (bounded, so a budget that fails to interrupt fails the test
    instead of hanging it)."""

    ran_out = 0  # how often the loop ended on its own: the budget failed to stop it

    def generate(self, victim, x, y):
        give_up = time.monotonic() + 90
        while time.monotonic() < give_up:
            victim.model(x)
        type(self).ran_out += 1
        return x


@register_defense("nan-outputs-v1", kwargs=KWARGS, dataset_kwargs=DATASET_KWARGS)
class NaNOutputs(Defense):
    def __init__(self, **kwargs):
        self.train_kwargs = training_kwargs(kwargs)

    def fit(self, model, data, ctx):
        TRAIN

    def preprocess(self, x):
        return x * float("nan")
'''.replace("TRAIN", TRAIN_STANDARD)
)


def test_failing_cells_are_recorded_with_their_reason_and_retried_alone(tmp_path):
    with components(tmp_path / "mods", FAULTY):
        config = _matrix(
            tmp_path,
            ["standard-v1", "nan-outputs-v1"],
            ["fgsm-linf-v1", "raising-linf-v1", "nan-linf-v1", "stuck-linf-v1"],
            extra="cell_timeout = 2",
        )
        db = tmp_path / "results" / "robustmatrix.db"
        first = run_cli("run", "--config", str(config), "--quiet", cwd=tmp_path)
        assert first.code == 1, first.stderr
        cells = {
            (attack, eps): (status, error, wall_time)
            for attack, eps, status, error, wall_time in _rows(
                db, "SELECT attack_id, eps, status, error, wall_time FROM cells WHERE defense_id = 'standard-v1'"
            )
        }
        assert len(cells) == 8
        for eps in (0.1, 0.3):
            assert cells[("fgsm-linf-v1", eps)][0] == "ok"
            status, error, _ = cells[("raising-linf-v1", eps)]
            assert status == "failed" and error == "ValueError: deliberately raising attack"
            status, error, _ = cells[("nan-linf-v1", eps)]
            assert status == "failed" and "NaN/inf in the attack's adversarial examples (" in error
            status, error, _ = cells[("stuck-linf-v1", eps)]
            assert status == "failed" and error == "timeout: cell exceeded its time budget of 2 s"
        stuck = ATTACKS.get("stuck-linf-v1").load()
        assert stuck.ran_out == 0, "the budget must stop the attack inside its batch, not after it"
        assert _rows(db, "SELECT defense_id FROM cells WHERE defense_id = 'nan-outputs-v1'") == []
        assert _rows(db, "SELECT kind, error FROM failures") == [
            ("evaluation", "NonFiniteResult: NaN/inf in nan-outputs-v1's outputs on clean examples (60 of 60 examples)")
        ]
        assert "7 failure(s); everything else completed" in first.stderr
        assert "stuck-linf-v1 @ linf 0.3 (seed 0): timeout" in first.stderr
        ok_before = _rows(db, "SELECT cell_key, created_at FROM cells WHERE status = 'ok'")

        retried = run_cli("run", "--config", str(config), "--quiet", "--retry-failed", cwd=tmp_path)
        assert retried.code == 1
        assert _computed(retried.stderr) == (0, 6), "only the six failed cells are run again"
        assert _rows(db, "SELECT cell_key, created_at FROM cells WHERE status = 'ok'") == ok_before
        assert len(_rows(db, "SELECT 1 FROM cells")) == 8, "every cell exactly once"


ATTACK_MODULE = (
    HEADER
    + """
@register_attack("tweak-linf-v1", family="gradient", norm="linf", budget_defaults=Budget(steps=1, restarts=1))
class Tweak(Attack):
    def generate(self, victim, x, y):
        grad, _, _ = input_gradient(victim.model, x, y, loss_function("ce"))
        return clip_to_threat(x, x + self.eps * grad.sign(), "linf", self.eps)
"""
)
DEFENSE_MODULE = (
    HEADER
    + """
@register_defense("tweak-defense-v1", kwargs=KWARGS, dataset_kwargs=DATASET_KWARGS)
class TweakDefense(Defense):
    def __init__(self, **kwargs):
        self.train_kwargs = training_kwargs(kwargs)

    def fit(self, model, data, ctx):
        TRAIN
""".replace("TRAIN", TRAIN_STANDARD)
)


def test_editing_a_components_code_reruns_its_cells_and_nothing_else(tmp_path):
    with (
        components(tmp_path / "attack", ATTACK_MODULE) as attack,
        components(tmp_path / "defense", DEFENSE_MODULE) as defense,
    ):
        config = _matrix(tmp_path, ["standard-v1", "tweak-defense-v1"], ["fgsm-linf-v1", "tweak-linf-v1"])
        db = tmp_path / "results" / "robustmatrix.db"
        first = run_cli("run", "--config", str(config), "--quiet", cwd=tmp_path)
        assert first.code == 0 and _computed(first.stderr) == (2, 8), first.stderr

        attack.write(ATTACK_MODULE + "\n# a comment is a code change too\n")
        after_attack = run_cli("run", "--config", str(config), "--quiet", cwd=tmp_path)
        assert _computed(after_attack.stderr) == (0, 4), after_attack.stderr
        rerun = _rows(db, "SELECT DISTINCT attack_id FROM cells GROUP BY defense_id, attack_id, eps HAVING count() > 1")
        assert rerun == [("tweak-linf-v1",)]

        defense.write(DEFENSE_MODULE.replace("kwargs):", "kwargs):  # edited"))
        after_defense = run_cli("run", "--config", str(config), "--quiet", cwd=tmp_path)
        assert _computed(after_defense.stderr) == (1, 4), after_defense.stderr
        per_defense = dict(_rows(db, "SELECT defense_id, count(DISTINCT training_key) FROM trainings GROUP BY 1"))
        assert per_defense == {"standard-v1": 1, "tweak-defense-v1": 2}


def test_a_database_written_before_the_operations_tables_gains_them_on_open(tmp_path):
    from bench.storage.store import Store

    db = tmp_path / "old.db"
    Store.open(db).close()
    connection = sqlite3.connect(db)
    connection.executescript("DROP TABLE failures; DROP TABLE run_cells; DROP TABLE nightly;")
    connection.close()
    with Store.open_existing(db) as store:
        store.put_failure("k" * 32, "training", "standard-v1", "digits", 0, "boom")
        store.link_run_cells(store.start_run("run", {}, "cpu", {}, None), ["c" * 32])
        assert store.failure("k" * 32)["error"] == "boom"


CHEATING = (
    HEADER
    + '''
class Callable:
    """Plain callables, not Attack subclasses: only the scorer stands between them and the worst case."""

    def __init__(self, eps):
        self.eps = eps


class OutsideBall(Callable):
    def __call__(self, victim, x, y):
        return (x + 2 * self.eps * torch.randn_like(x).sign()).clamp(0, 1)


class OutsideBox(Callable):
    def __call__(self, victim, x, y):
        return x + 0.5 * self.eps


class WrongShape(Callable):
    def __call__(self, victim, x, y):
        return x[:-1]


for name, factory in (("outside-ball", OutsideBall), ("outside-box", OutsideBox), ("wrong-shape", WrongShape)):
    register_attack(f"{name}-linf-v1", family="gradient", norm="linf", budget_defaults=Budget(steps=1, restarts=1))(
        factory
    )
'''
)


def test_every_batch_of_a_plain_callable_attack_is_checked_for_ball_box_and_shape(tmp_path):
    with components(tmp_path / "mods", CHEATING):
        attacks = ["fgsm-linf-v1", "outside-ball-linf-v1", "outside-box-linf-v1", "wrong-shape-linf-v1"]
        config = _matrix(tmp_path, ["standard-v1"], attacks)
        result = run_cli("run", "--config", str(config), "--quiet", cwd=tmp_path)
        assert result.code == 1, result.stderr
        db = tmp_path / "results" / "robustmatrix.db"
        cells = {(a, e): (s, err) for a, e, s, err in _rows(db, "SELECT attack_id, eps, status, error FROM cells")}
        for eps in (0.1, 0.3):
            assert cells[("fgsm-linf-v1", eps)] == ("ok", None)
            status, error = cells[("outside-ball-linf-v1", eps)]
            assert status == "failed" and "left the linf ball" in error and f"> eps {eps}" in error
            status, error = cells[("outside-box-linf-v1", eps)]
            assert status == "failed" and "left the [0, 1] image box" in error
            status, error = cells[("wrong-shape-linf-v1", eps)]
            assert status == "failed" and "returned shape" in error


def test_a_defense_whose_cells_failed_is_unranked_with_the_failed_attacks_named_until_they_are_dropped(tmp_path):
    from leaderboard.report import build_report

    with components(tmp_path / "mods", FAULTY):
        config = _matrix(tmp_path, ["standard-v1"], ["fgsm-linf-v1", "raising-linf-v1"])
        assert run_cli("run", "--config", str(config), "--quiet", cwd=tmp_path).code == 1
        db = tmp_path / "results" / "robustmatrix.db"
        (entry,) = build_report(db)["datasets"][0]["defenses"]
        assert entry["rank"] is None and entry["worst_case"] is None, "a failed attack leaves the worst case open"
        assert entry["failed_attacks"] == [
            {"attack": "raising-linf-v1", "norm": "linf", "eps": eps} for eps in (0.1, 0.3)
        ]
        board = run_cli("leaderboard", "--db", str(db), "--out", str(tmp_path / "board"), cwd=tmp_path)
        assert board.code == 0, board.stderr
        assert "cells failed (raising-linf-v1 at linf 0.1" in (tmp_path / "board" / "leaderboard.md").read_text()
        # The user drops the broken attack from the matrix: the defense is ranked again.
        config = _matrix(tmp_path, ["standard-v1"], ["fgsm-linf-v1"])
        assert run_cli("run", "--config", str(config), "--quiet", cwd=tmp_path).code == 0
        (entry,) = build_report(db)["datasets"][0]["defenses"]
        assert entry["rank"] == 1 and entry["failed_attacks"] == []
