"""The nightly job: a first run is the baseline; after a deliberate change to an attack the next run
names exactly the changed cells and exits non-zero; an unchanged night reports nothing. The GitHub
workflow runs the same commands as the README."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from bench.commands.nightly import compare
from tests.components import HEADER, components
from tests.conftest import REPO, run_cli, write_matrix

SCALED_FGSM = (
    HEADER
    + '''
STRENGTH = 0.15


@register_attack("scaled-fgsm-linf-v1", family="gradient", norm="linf", budget_defaults=Budget(steps=1, restarts=1))
class ScaledFGSM(Attack):
    """One signed-gradient step of STRENGTH x eps: the test makes it stronger between two nights."""

    def generate(self, victim, x, y):
        grad, _, _ = input_gradient(victim.model, x, y, loss_function("ce"))
        return clip_to_threat(x, x + STRENGTH * self.eps * grad.sign(), "linf", self.eps)
'''
)

NIGHTLY_MATRIX = """
dataset = "digits"
defenses = ["standard-v1"]
attacks = ["fgsm-linf-v1", "scaled-fgsm-linf-v1"]
n_eval = 80
[eps]
linf = [0.1, 0.3]
[defense_kwargs."*"]
epochs = 4
"""


def _nightly(tmp_path, config, out):
    return run_cli(
        "nightly", "--config", str(config), "--db", str(tmp_path / "n.db"), "--out", str(out), "--quiet", cwd=tmp_path
    )


def test_two_nightly_runs_with_a_changed_attack_name_the_changed_cells(tmp_path):
    config = write_matrix(tmp_path / "matrix.toml", NIGHTLY_MATRIX)
    with components(tmp_path / "mods", SCALED_FGSM) as module:
        first = _nightly(tmp_path, config, tmp_path / "night1")
        assert first.code == 0, first.stderr
        baseline = json.loads((tmp_path / "night1" / "regressions.json").read_text())
        assert baseline["previous"] is None and baseline["regressed"] is False
        assert "this one is the baseline" in (tmp_path / "night1" / "regressions.md").read_text()
        assert (tmp_path / "night1" / "nightly-history.png").stat().st_size > 1000
        assert (tmp_path / "night1" / "leaderboard.md").exists()

        module.write(SCALED_FGSM.replace("STRENGTH = 0.15", "STRENGTH = 1.0"))
        second = _nightly(tmp_path, config, tmp_path / "night2")
        assert second.code == 1, second.stderr
        assert "nightly regressions:" in second.stderr
        report = json.loads((tmp_path / "night2" / "regressions.json").read_text())
        assert report["regressed"] and report["previous"]["run_id"] == baseline["run"]["run_id"]
        changed = {(c["defense"], c["attack"], c["threat"]) for c in report["changed_cells"]}
        assert ("standard-v1", "scaled-fgsm-linf-v1", "linf 0.3") in changed
        assert {attack for _, attack, _ in changed} == {"scaled-fgsm-linf-v1"}, "unchanged cells are not named"
        for cell in report["changed_cells"]:
            assert cell["after"] < cell["interval"][0] and cell["cause"] == "attack code changed"
        (worst,) = report["worst_case"]
        assert worst["defense"] == "standard-v1" and worst["changed"] == [], "FGSM already broke those examples"
        assert report["attacks"] == {"added": [], "removed": []}
        speed = {s["attack"]: s for s in report["attack_speed"]}
        assert speed["scaled-fgsm-linf-v1"]["rerun"] and not speed["fgsm-linf-v1"]["rerun"]
        markdown = (tmp_path / "night2" / "regressions.md").read_text()
        assert re.search(r"\| standard-v1 \| scaled-fgsm-linf-v1 \| linf 0.3 \| 0 \|", markdown)
        assert "attack code changed" in markdown and "![worst case per defense over nightly runs]" in markdown

        third = _nightly(tmp_path, config, tmp_path / "night3")
        assert third.code == 0, third.stderr
        quiet = json.loads((tmp_path / "night3" / "regressions.json").read_text())
        assert not quiet["regressed"] and quiet["changed_cells"] == []

    connection = sqlite3.connect(tmp_path / "n.db")
    runs = connection.execute("SELECT kind, status, git_commit, versions, device FROM runs ORDER BY run_id").fetchall()
    covered = connection.execute("SELECT run_id, count() FROM run_cells GROUP BY run_id").fetchall()
    connection.close()
    assert [r[:2] for r in runs] == [("nightly", "ok")] * 3
    assert all(json.loads(r[3])["torch"] and r[4] == "cpu" for r in runs)
    assert [n for _, n in covered] == [4, 4, 4]


def _snapshot(**overrides):
    base = {
        "run": {"run_id": 1, "started_at": "2026-01-01T00:00:00+00:00", "git_commit": None, "versions": {}},
        "cells": [],
        "worst_case": {},
        "flags": {"a-v1": []},
        "attack_speed": {"pgd-linf-v1": {"per_example": 0.001, "wall_time": 2.0, "computed": True}},
        "defenses": ["a-v1", "b-v1"],
        "attacks": ["pgd-linf-v1"],
        "failures": [],
    }
    base.update(overrides)
    return base


def _worst(accuracy: float) -> dict:
    return {"a-v1": {"mean": accuracy, "threats": {"linf 0.3": {"accuracy": accuracy, "n": 100}}}}


def test_worst_cases_flags_removed_components_and_slowdowns_are_regressions():
    before = _snapshot(worst_case=_worst(0.50))
    after = _snapshot(
        worst_case=_worst(0.38),
        flags={"a-v1": ["randomized outputs"]},
        defenses=["a-v1", "c-v1"],
        attack_speed={"pgd-linf-v1": {"per_example": 0.0031, "wall_time": 6.2, "computed": True}},
    )
    report = compare(before, after, max_slowdown=1.5)
    (worst,) = report["worst_case"]
    assert worst["changed"][0]["threat"] == "linf 0.3" and worst["changed"][0]["interval"][0] > 0.38
    assert compare(before, _snapshot(worst_case=_worst(0.42)))["worst_case"][0]["changed"] == [], "inside the CI"
    assert report["flags"]["new"] == {"a-v1": ["randomized outputs"]}
    assert report["defenses"] == {"added": ["c-v1"], "removed": ["b-v1"]}
    assert report["attack_speed"][0]["slower"] and report["attack_speed"][0]["ratio"] == pytest.approx(3.1)
    assert len(report["reasons"]) == 4 and report["regressed"]
    cleared = compare(after, _snapshot(defenses=["a-v1", "c-v1"]), max_slowdown=4)
    assert cleared["flags"]["cleared"] == {"a-v1": ["randomized outputs"]} and not cleared["regressed"]


# ---------------------------------------------------------------------------------- workflow
def _readme_install_commands() -> list[str]:
    """The README's first command, split at '&&', without the final `robustmatrix run`."""
    readme = (REPO / "README.md").read_text()
    first = re.search(r"```bash\n(.+?)\n```", readme, re.S).group(1).strip()
    commands = [c.strip() for c in first.split("&&")]
    assert commands[-1] == "robustmatrix run"
    return commands[:-1]


def _readme_nightly_command() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### The nightly job") :]
    return re.search(r"```bash\n(robustmatrix nightly[^\n]*)\n```", section).group(1).strip()


def test_the_nightly_workflow_installs_and_runs_as_the_readme_says():
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the workflow (it comes with the test and ray extras)")
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "nightly.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert "schedule" in triggers and triggers["schedule"][0]["cron"]
    (job,) = workflow["jobs"].values()
    steps = job["steps"]
    runs = [step for step in steps if "run" in step]
    install = [line.strip() for line in runs[0]["run"].strip().splitlines()]
    assert install == _readme_install_commands()
    nightly = [line.strip() for line in runs[1]["run"].strip().splitlines()]
    assert nightly[0] == ". .venv/bin/activate" and nightly[1:] == [_readme_nightly_command()]
    out = re.search(r"--out (\S+)", _readme_nightly_command()).group(1)
    db = re.search(r"--db (\S+)", _readme_nightly_command()).group(1)
    caches = [s for s in steps if s.get("uses", "").startswith("actions/cache/")]
    assert {s["uses"].split("@")[0] for s in caches} == {"actions/cache/restore", "actions/cache/save"}
    for cache in caches:  # the database must persist between nights, or every night is a new baseline
        assert db.startswith(cache["with"]["path"].rstrip("/") + "/"), (cache["with"]["path"], db)
    index = re.search(r"--index-url ([^\s`]+)", (REPO / "README.md").read_text()).group(1)
    assert job.get("env", {}).get("PIP_EXTRA_INDEX_URL") in (None, index), "the workflow's torch index is the README's"
    uploads = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert uploads and uploads[0]["with"]["path"] == out and uploads[0].get("if") == "always()"


def _cell(attack_id: str, eps: float, wall_time: float, computed: bool, robust: float = 0.5) -> dict:
    return {
        "cell_key": f"{attack_id}-{eps}",
        "dataset": "digits",
        "defense_id": "a-v1",
        "attack_id": attack_id,
        "attack_version": "v",
        "training_key": "t",
        "norm": "linf",
        "eps": eps,
        "seed": 0,
        "n_eval": 100,
        "status": "ok",
        "error": None,
        "robust_accuracy": robust,
        "wall_time": wall_time,
        "attacked": 100,
        "computed": computed,
    }


def test_a_slowdown_is_timed_on_re_run_cells_only_and_a_dropped_cell_is_a_regression():
    from bench.commands.nightly import _attack_speed

    # Nine cached cells at the old speed and one re-run cell five times slower: the re-run one decides.
    cells = [_cell("pgd-linf-v1", 0.1 * i, 1.0, computed=False) for i in range(1, 10)]
    cells.append(_cell("pgd-linf-v1", 1.0, 5.0, computed=True))
    speed = _attack_speed(cells)
    assert speed["pgd-linf-v1"]["per_example"] == pytest.approx(0.05) and speed["pgd-linf-v1"]["computed"]
    before = _snapshot(attack_speed={"pgd-linf-v1": {"per_example": 0.01, "wall_time": 1.0, "computed": True}})
    report = compare(before, _snapshot(attack_speed=speed))
    assert report["attack_speed"][0]["slower"] and report["regressed"]

    previous = _snapshot(cells=[_cell("pgd-linf-v1", 0.1, 1.0, True), _cell("pgd-linf-v1", 0.2, 1.0, True)])
    current = _snapshot(cells=[_cell("pgd-linf-v1", 0.1, 1.0, False)])
    dropped = compare(previous, current)
    assert dropped["dropped_cells"] == ["digits/a-v1/pgd-linf-v1/linf 0.2/seed 0/n 100"]
    assert dropped["regressed"] and "no longer covered" in " ".join(dropped["reasons"])


def test_the_nightly_worst_case_is_the_leaderboards_nested_over_eps(tmp_path):
    import numpy as np

    from bench.commands.nightly import worst_cases
    from tests.leaderboard_data import FakeDefense, write_database

    small, large = np.ones(100, dtype=bool), np.ones(100, dtype=bool)
    small[:10] = False  # broken within eps 0.1 ...
    large[20:] = False  # ... and the eps-0.2 run happened to miss them
    db = write_database(
        tmp_path / "r.db", [FakeDefense("d-v1", {("pgd-linf-v1", 0.1): small, ("pgd-linf-v1", 0.2): large})]
    )
    threats = worst_cases(db, {"d-v1"})["d-v1"]["threats"]
    assert threats["linf 0.1"]["accuracy"] == 0.9
    assert threats["linf 0.2"]["accuracy"] == 0.1, "what broke at 0.1 is broken at 0.2 too"
