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


def _nightly(tmp_path, config, out, *extra):
    return run_cli(
        "nightly",
        "--config",
        str(config),
        "--db",
        str(tmp_path / "n.db"),
        "--out",
        str(out),
        "--quiet",
        *extra,
        cwd=tmp_path,
    )


def test_a_nightly_run_without_a_previous_one_fails_unless_it_is_the_baseline(tmp_path):
    """A database lost between nights (an evicted cache) must not pass as a quiet new baseline: the
    run is refused, in one line and before any work, unless --baseline says it is the first."""
    config = write_matrix(tmp_path / "matrix.toml", NIGHTLY_MATRIX)
    missing = _nightly(tmp_path, config, tmp_path / "night")
    assert missing.code == 2, missing.stderr
    (line,) = missing.stderr.strip().splitlines()
    assert "no previous nightly run in" in line and "pass --baseline" in line
    assert not (tmp_path / "n.db").exists(), "refused before the matrix ran"

    from bench.storage.store import Store

    with Store.open(tmp_path / "n.db"):
        pass  # a database with results but no nightly snapshot is no baseline either
    empty = _nightly(tmp_path, config, tmp_path / "night")
    assert empty.code == 2 and "pass --baseline" in empty.stderr


def test_two_nightly_runs_with_a_changed_attack_name_the_changed_cells(tmp_path):
    config = write_matrix(tmp_path / "matrix.toml", NIGHTLY_MATRIX)
    with components(tmp_path / "mods", SCALED_FGSM) as module:
        first = _nightly(tmp_path, config, tmp_path / "night1", "--baseline")
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


def _documented_nightly_command() -> str:
    operations = (REPO / "docs" / "operations.md").read_text()
    section = operations[operations.index("### The nightly job") :]
    return re.search(r"```bash\n(robustmatrix nightly[^\n]*)\n```", section).group(1).strip()


def _workflow() -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the workflow (it comes with the test and ray extras)")
    return yaml.safe_load((REPO / ".github" / "workflows" / "nightly.yml").read_text())


def test_the_nightly_workflow_installs_and_runs_as_documented():
    workflow = _workflow()
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert "schedule" in triggers and triggers["schedule"][0]["cron"]
    (job,) = workflow["jobs"].values()
    steps = job["steps"]
    runs = [step for step in steps if "run" in step]
    install = [line.strip() for line in runs[0]["run"].strip().splitlines()]
    index = re.search(r"--index-url ([^\s`]+)", (REPO / "README.md").read_text()).group(1)
    expected = [
        f"{c} --index-url {index}" if c.startswith("pip install torch") else c for c in _readme_install_commands()
    ]
    assert install == expected, "torch alone from the PyTorch index, everything else from PyPI"
    nightly = [line.strip() for line in runs[-1]["run"].strip().splitlines()]
    assert nightly == [". .venv/bin/activate", _documented_nightly_command() + " $BASELINE"]
    out = re.search(r"--out (\S+)", _documented_nightly_command()).group(1)
    db = re.search(r"--db (\S+)", _documented_nightly_command()).group(1)
    caches = [s for s in steps if s.get("uses", "").startswith("actions/cache/")]
    assert {s["uses"].split("@")[0] for s in caches} == {"actions/cache/restore", "actions/cache/save"}
    for cache in caches:  # the database must persist between nights, or every night is a new baseline
        assert db.startswith(cache["with"]["path"].rstrip("/") + "/"), (cache["with"]["path"], db)
    uploads = {s["with"]["path"]: s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@")}
    assert set(uploads) == {out, db}, "the report, and the database (so a lost cache is noticed)"
    assert all(u.get("if") == "always()" for u in uploads.values())


def test_the_nightly_workflow_is_hardened():
    """Read-only token, no credentials left in the checkout, actions pinned by commit, no job-wide
    extra index (dependency confusion), the report folder emptied before the run, and --baseline
    only from a manual run's input."""
    workflow = _workflow()
    assert workflow["permissions"] == {"contents": "read"}
    (job,) = workflow["jobs"].values()
    assert job.get("permissions", {"contents": "read"}) == {"contents": "read"}
    steps = job["steps"]
    for scope in (workflow, job, *steps):
        assert not any("INDEX_URL" in name for name in scope.get("env", {})), scope.get("env")
    for step in steps:
        if "uses" in step:
            assert re.fullmatch(r"actions/[\w/-]+@[0-9a-f]{40}", step["uses"]), step["uses"]
    (checkout,) = [s for s in steps if s.get("uses", "").startswith("actions/checkout@")]
    assert checkout["with"]["persist-credentials"] is False
    runs = [step["run"] for step in steps if "run" in step]
    assert all("--extra-index-url" not in run for run in runs)
    out = re.search(r"--out (\S+)", _documented_nightly_command()).group(1)
    names = [s.get("name", s.get("uses")) for s in steps]
    (empty,) = [i for i, s in enumerate(steps) if s.get("run", "").strip() == f"rm -rf {out}"]
    restore = next(i for i, s in enumerate(steps) if s.get("uses", "").startswith("actions/cache/restore@"))
    nightly = next(i for i, s in enumerate(steps) if "robustmatrix nightly" in s.get("run", ""))
    assert restore < empty < nightly, names
    triggers = workflow.get("on", workflow.get(True))
    assert triggers["workflow_dispatch"]["inputs"]["baseline"]["type"] == "boolean"
    assert steps[nightly]["env"]["BASELINE"] == "${{ inputs.baseline && '--baseline' || '' }}"


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
