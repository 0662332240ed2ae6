"""A plugin defense that is randomized or masks gradients *without declaring it* still meets the
attacks it needs: the harness observes the behaviour, pairs EOT / BPDA / logit-space attacks with it,
runs the adaptive worst case, and the leaderboard flags it and names the attack that broke it.

The two defenses are registered the way an entry point would register them (a spec in the registry
before the CLI runs) and run through the real CLI on a small digits matrix."""

from __future__ import annotations

import json

import pytest
import torch

from bench.foundation.registry import DEFENSES
from bench.foundation.specs import DefenseSpec
from defenses.standard import Standard
from tests.conftest import run_cli, write_matrix


class SilentNoise(Standard):
    """Adds noise at inference and says nothing about it (randomized=False is the default)."""

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 0.3 * torch.randn_like(x)).clamp(0, 1)


class SilentOneBit(Standard):
    """Binarizes its input (zero gradients) and declares itself differentiable."""

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return (x > 0.5).float()


PLUGINS = {"silent-noise-v1": SilentNoise, "silent-one-bit-v1": SilentOneBit}

MATRIX = """
dataset = "digits"
defenses = ["standard-v1", "silent-noise-v1", "silent-one-bit-v1"]
attacks = ["pgd-linf-v1", "apgd-ce-linf-v1", "square-linf-v1", "eot-pgd-linf-v1", "bpda-pgd-linf-v1",
           "logit-pgd-linf-v1", "adaptive-worst-case-linf-v1"]
seeds = [0]
n_eval = 120
[eps]
linf = [0.2]
[defense_kwargs."*"]
epochs = 8
[attack_kwargs."square-linf-v1"]
queries = 40
"""


@pytest.fixture(scope="module")
def leaderboard(tmp_path_factory):
    base = DEFENSES.get("standard-v1")
    for defense_id, factory in PLUGINS.items():
        DEFENSES.register(DefenseSpec(id=defense_id, factory=factory, kwargs=dict(base.kwargs)))
    try:
        root = tmp_path_factory.mktemp("undeclared")
        result = run_cli("run", "--config", str(write_matrix(root / "m.toml", MATRIX)), "--quiet", cwd=root)
    finally:
        for defense_id in PLUGINS:
            DEFENSES.unregister(defense_id)
    assert result.code == 0, result.stderr
    report = json.loads((root / "results" / "leaderboard.json").read_text())
    return {d["defense"]: d for d in report["datasets"][0]["defenses"]}


def _cells(entry: dict) -> dict[str, float]:
    return {c["attack"]: c["robust_accuracy"] for c in entry["cells"]}


def _flags(entry: dict) -> set[str]:
    return {f["key"] for f in entry["flags"]}


def test_undeclared_randomness_is_flagged_and_broken_by_eot(leaderboard):
    entry = leaderboard["silent-noise-v1"]
    cells = _cells(entry)
    assert "undeclared-randomness" in _flags(entry)
    assert {"eot-pgd-linf-v1", "adaptive-worst-case-linf-v1"} <= set(cells), "EOT and the cascade were paired"
    (worst,) = entry["worst_case_by_threat"]
    assert worst["value"] <= min(cells.values()) + 1e-9, "the reported number is the worst case over all attacks"
    assert worst["value"] < cells["pgd-linf-v1"], "single-sample PGD overstates a randomized defense"


def test_undeclared_gradient_masking_is_flagged_and_broken_by_bpda(leaderboard):
    entry = leaderboard["silent-one-bit-v1"]
    cells = _cells(entry)
    assert {"zero-gradients", "standard-evaluation-unreliable"} <= _flags(entry)
    assert {"bpda-pgd-linf-v1", "adaptive-worst-case-linf-v1"} <= set(cells)
    assert cells["bpda-pgd-linf-v1"] <= cells["pgd-linf-v1"] - 0.2, "BPDA with an identity backward pass breaks it"
    (worst,) = entry["worst_case_by_threat"]
    assert worst["strongest_attack"] in {"bpda-pgd-linf-v1", "adaptive-worst-case-linf-v1"}
    assert entry["worst_case"] <= cells["bpda-pgd-linf-v1"] + 1e-9


def test_the_undefended_model_gets_no_adaptive_attacks(leaderboard):
    cells = _cells(leaderboard["standard-v1"])
    assert not {"eot-pgd-linf-v1", "bpda-pgd-linf-v1", "logit-pgd-linf-v1"} & set(cells)
    assert _flags(leaderboard["standard-v1"]) <= {"not-near-chance"}
