"""Verifiers in a matrix, end to end on a tiny digits run: certificates stored per defense and Lp
threat model, the leaderboard's [certified, worst case] bracket, and the certified-but-broken flag —
which fires on a deliberately unsound verifier and never on the real ones. Turning verifiers on
changes no training or cell key."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace

import numpy as np
import pytest
import torch

from bench.foundation.config import preset
from bench.foundation.data import load_dataset
from bench.foundation.plugins import load_builtins
from bench.foundation.registry import VERIFIERS, register_verifier
from bench.storage.store import encode_mask
from tests.conftest import run_cli, write_matrix
from verifiers.base import Verifier

MATRIX = """
dataset = "digits"
defenses = ["standard-v1"]
attacks = ["pgd-linf-v1", "pgd-l2-v1"]
verifiers = VERIFIERS
seeds = [0]
n_eval = 60
[eps]
linf = [0.02, 0.1]
l2 = [0.3]
[defense_kwargs."*"]
epochs = 3
[attack_kwargs."pgd-linf-v1"]
steps = 10
[attack_kwargs."pgd-l2-v1"]
steps = 10
"""


class Everything(Verifier):
    """Unsound on purpose: certifies every example."""

    def certify(self, model, x, y, norm, eps):  # noqa: ANN001, ANN201
        return torch.ones_like(y, dtype=torch.bool)


@pytest.fixture(scope="module")
def unsound_verifier():
    load_builtins()
    register_verifier("everything-unsound-v1", norms=("linf", "l2"))(Everything)
    yield "everything-unsound-v1"
    VERIFIERS.unregister("everything-unsound-v1")


def _run(root, verifiers: list[str]) -> dict:
    config = write_matrix(root / "matrix.toml", MATRIX.replace("VERIFIERS", json.dumps(verifiers)))
    result = run_cli("run", "--config", str(config), "--quiet", cwd=root)
    assert result.code == 0, result.stderr
    return json.loads((root / "results" / "leaderboard.json").read_text())


def _defense(report: dict) -> dict:
    (data,) = report["datasets"]
    (defense,) = data["defenses"]
    return defense


def test_certificates_bracket_the_worst_case_and_the_flag_catches_an_unsound_verifier(tmp_path, unsound_verifier):
    report = _run(tmp_path, ["ibp-v1", "crown-ibp-v1"])
    assert report["schema"] == "robustmatrix-leaderboard/3"
    defense = _defense(report)
    assert "certified-but-broken" not in {f["key"] for f in defense["flags"]}
    by_threat = {(t["norm"], t["eps"]): t for t in defense["worst_case_by_threat"]}
    assert set(by_threat) == {("linf", 0.02), ("linf", 0.1), ("l2", 0.3)}
    for threat in by_threat.values():
        assert threat["certified"] is not None and threat["certified"]["value"] <= threat["value"]
        assert {r["verifier"] for r in threat["certified"]["verifiers"]} == {"ibp-v1", "crown-ibp-v1"}
    assert by_threat[("linf", 0.02)]["certified"]["value"] > 0  # a real bound, not only zeros
    db = tmp_path / "results" / "robustmatrix.db"
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT count(*) FROM verifications WHERE status = 'ok'").fetchone()[0] == 6
        cells = connection.execute("SELECT count(*) FROM cells").fetchone()[0]
        config = json.loads(connection.execute("SELECT config FROM runs ORDER BY run_id DESC").fetchone()[0])
    assert config["verifiers"] == ["ibp-v1", "crown-ibp-v1"]
    assert "[certified, worst case]" in (tmp_path / "results" / "leaderboard.md").read_text()

    flagged = _defense(_run(tmp_path, ["ibp-v1", "crown-ibp-v1", unsound_verifier]))
    flag = next(f for f in flagged["flags"] if f["key"] == "certified-but-broken")
    assert unsound_verifier in flag["evidence"] and "seed 0: [" in flag["evidence"]
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT count(*) FROM cells").fetchone()[0] == cells  # nothing re-run
        assert connection.execute("SELECT count(*) FROM verifications").fetchone()[0] == 9


def test_verifiers_change_no_training_or_cell_key() -> None:
    from bench.execution.runner import Runner
    from bench.foundation.registry import DEFENSES

    load_builtins()
    spec = preset("default")
    data = load_dataset(spec.dataset)
    plain = Runner(spec, data, None)
    certified = Runner(replace(spec, verifiers=("ibp-v1", "crown-v1")), data, None)
    assert not plain.verification_jobs(plain.training_job(DEFENSES.get("standard-v1"), 0), {"clean_mask": b""})
    evaluation = {"observed": "{}", "clean_mask": encode_mask(np.ones(spec.n_eval, bool))}
    for defense in plain.defenses:
        a, b = plain.training_job(defense, 0), certified.training_job(defense, 0)
        assert a == b
        surrogate = {0: plain.training_job(DEFENSES.get("standard-v1"), 0)}
        assert [c.cell_key for c in plain.cell_jobs(a, evaluation, surrogate)] == [
            c.cell_key for c in certified.cell_jobs(b, evaluation, surrogate)
        ]
    assert len(certified.verification_jobs(a, evaluation)) == 2 * (3 + 3)  # two verifiers x Linf and L2 eps


def test_a_smoothing_certificate_contradicted_by_the_vote_has_its_own_flag() -> None:
    from leaderboard.report import certificates
    from leaderboard.results import Verification

    robust = np.array([True, False, True, False])
    worst = {("l2", 0.5): {"masks": {0: robust}}}
    smoothed = Verification(
        "d-v1", "smoothing-v1", "l2", 0.5, 0, "ok", None, np.array([1, 1, 0, 0], bool), 1.0, "smoothed"
    )
    sound = Verification("d-v1", "ibp-v1", "l2", 0.5, 0, "ok", None, np.array([1, 0, 0, 0], bool), 0.1)
    entries, masks = certificates([smoothed, sound], worst)
    assert entries[("l2", 0.5)]["value"] == 0.5  # the union: examples 0 and 1
    from leaderboard.flags import certified_but_broken

    assert certified_but_broken(worst, masks.get("model", {})) is None
    flag = certified_but_broken(worst, masks["smoothed"], "smoothed-vote-disagrees")
    assert flag is not None and flag.key == "smoothed-vote-disagrees" and "[1]" in flag.evidence
