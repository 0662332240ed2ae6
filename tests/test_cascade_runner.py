"""The adaptive worst case as the runner computes it: a cascade cell waits for its members' cells at
its eps and every smaller one (and its own cells at the smaller eps), attacks only what they all left
robust, and so is never above any of them — even on a randomized defense, where each member's own
run draws differently. Its key covers its members' keys."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace

import numpy as np
import pytest
import torch

from attacks.cascade import AdaptiveWorstCase
from bench.execution.jobs import TrainingJob
from bench.execution.runner import Runner
from bench.execution.shard import Shard
from bench.foundation.config import MatrixSpec
from bench.foundation.registry import DEFENSES
from bench.storage.store import decode_mask, encode_mask
from tests.conftest import run_cli, write_matrix

MATRIX = """
dataset = "digits"
defenses = ["random-resize-pad-v1"]
attacks = ["fgsm-linf-v1", "pgd-linf-v1", "noise-linf-v1", "eot-pgd-linf-v1", "adaptive-worst-case-linf-v1"]
seeds = [0]
n_eval = 80
[eps]
linf = [0.05, 0.1]
[defense_kwargs."*"]
epochs = 3
[attack_kwargs."pgd-linf-v1"]
steps = 5
[attack_kwargs."eot-pgd-linf-v1"]
steps = 4
eot_samples = 2
[attack_kwargs."adaptive-worst-case-linf-v1"]
grade = { steps = 8 }
stages = [["apgd-ce-linf-v1", { steps = 10 }], ["square-linf-v1", { queries = 50 }]]
"""


@pytest.fixture(scope="module")
def randomized_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    result = run_cli("run", "--config", str(write_matrix(root / "m.toml", MATRIX)), "--quiet", cwd=root)
    assert result.code == 0, result.stderr
    connection = sqlite3.connect(root / "results" / "robustmatrix.db")
    connection.row_factory = sqlite3.Row
    rows = connection.execute("SELECT * FROM cells").fetchall()
    connection.close()
    return rows


def test_the_cascade_cell_is_never_above_any_member_cell(randomized_run):
    by_eps: dict[float, dict[str, np.ndarray]] = {}
    for row in randomized_run:
        assert row["status"] == "ok", row["error"]
        by_eps.setdefault(row["eps"], {})[row["attack_id"]] = decode_mask(row["robust_mask"], row["n_eval"])
    assert set(by_eps) == {0.05, 0.1}
    cascade_id = "adaptive-worst-case-linf-v1"
    for eps, masks in by_eps.items():
        cascade = masks[cascade_id]
        assert {"eot-pgd-linf-v1", "pgd-linf-v1", "fgsm-linf-v1", "noise-linf-v1", cascade_id} <= set(masks)
        for smaller in [e for e in by_eps if e <= eps]:  # nested: what broke inside a smaller ball too
            for attack_id, member in by_eps[smaller].items():
                where = f"{attack_id} broke the example at {smaller}"
                assert not (cascade & ~member).any(), f"cascade robust at {eps} where {where}"
        assert cascade.sum() <= min(m.sum() for m in masks.values())


def test_the_cascade_attacks_only_the_survivors_of_its_members(randomized_run):
    """Its cost counts only the examples every member's cell left robust."""
    cells = {(row["attack_id"], row["eps"]): row for row in randomized_run}
    attacked = 0
    for eps in (0.05, 0.1):
        survivors = None
        for (attack_id, cell_eps), row in cells.items():
            if cell_eps <= eps and (attack_id != "adaptive-worst-case-linf-v1" or cell_eps < eps):
                mask = decode_mask(row["robust_mask"], row["n_eval"])
                survivors = mask if survivors is None else survivors & mask
        cascade = cells[("adaptive-worst-case-linf-v1", eps)]
        kwargs = json.loads(cascade["attack_kwargs"])
        assert kwargs["members"][0][0] == "eot-pgd-linf-v1", "a randomized defense's cascade opens with EOT"
        # Every stage runs at most its declared budget on each survivor, plus the confirming passes.
        per_example, _ = AdaptiveWorstCase(
            eps, "linf", kwargs["members"], kwargs["stages"], kwargs["grade"]
        ).max_passes_per_example()
        assert cascade["forwards"] <= int(survivors.sum()) * per_example
        assert (cascade["forwards"] > 0) == bool(survivors.any()), "it runs exactly when something survived"
        clean = decode_mask(cascade["robust_mask"], 80) | decode_mask(cascade["success_mask"], 80)
        assert int(survivors.sum()) < int(clean.sum()), "the members broke some examples: the cascade skips them"
        attacked += bool(survivors.any())
    assert attacked, "at the smaller eps some examples survive every member (else this test shows nothing)"


def test_a_cascade_key_changes_with_any_member_and_cascades_share_their_members_shard(digits):
    spec = MatrixSpec(eps={"linf": (0.1, 0.2)}, n_eval=10)
    kwargs = DEFENSES.get("standard-v1").resolve_kwargs("digits")
    training = TrainingJob("t" * 32, "standard-v1", kwargs, "digits", 0, "x.pt")
    row = {"observed": json.dumps({}), "clean_mask": encode_mask(torch.ones(10, dtype=torch.bool).numpy())}

    def plan(matrix: MatrixSpec):
        jobs = Runner(matrix, digits, executor=None).cell_jobs(training, row, {0: training})
        return {(j.attack_id, j.eps): j for j in jobs}

    before = plan(spec)
    after = plan(replace(spec, attack_kwargs={"square-linf-v1": {"queries": 7}}))
    for eps in (0.1, 0.2):
        cascade = before[("adaptive-worst-case-linf-v1", eps)]
        members = {job.cell_key for (attack_id, e), job in before.items() if e <= eps and job is not cascade}
        assert set(cascade.members) <= members and len(cascade.members) >= 3
        smaller = [job.cell_key for (attack_id, e), job in before.items() if e < eps]
        assert set(smaller) <= set(cascade.members), "nested: every cell at a smaller eps, the cascade's own too"
        assert after[("square-linf-v1", eps)].cell_key != before[("square-linf-v1", eps)].cell_key
        assert after[("adaptive-worst-case-linf-v1", eps)].cell_key != cascade.cell_key
        assert after[("pgd-linf-v1", eps)].cell_key == before[("pgd-linf-v1", eps)].cell_key
        # Whatever the shard count, a cascade lands in the shard of its members.
        by_key = {job.cell_key: job for job in before.values()}
        for count in (2, 3, 5):
            owner = [i for i in range(1, count + 1) if Shard(i, count).owns(cascade.group_key)]
            for key in cascade.members:
                assert Shard(owner[0], count).owns(by_key[key].group_key)


@pytest.mark.parametrize(
    ("defense_id", "black_box"),
    [("random-resize-pad-v1", True), ("art-jpeg-v1", True), ("distillation-v1", False), ("pgd-at-linf-v1", False)],
)
def test_the_black_box_stage_runs_where_gradients_cannot_be_trusted(digits, defense_id, black_box):
    """AutoAttack's Square escalates on a randomized or non-differentiable defense, not on one whose
    gradients (or, for a saturated softmax, logits) are honest; the cascade's key follows."""
    kwargs = DEFENSES.get(defense_id).resolve_kwargs("digits")
    training = TrainingJob("t" * 32, defense_id, kwargs, "digits", 0, "x.pt")
    row = {"observed": json.dumps({}), "clean_mask": encode_mask(torch.ones(10, dtype=torch.bool).numpy())}
    jobs = Runner(MatrixSpec(eps={"linf": (0.1,)}, n_eval=10), digits, executor=None).cell_jobs(
        training, row, {0: training}
    )
    cascade = next(j for j in jobs if j.attack_id == "adaptive-worst-case-linf-v1")
    assert cascade.attack_kwargs["black_box"] is black_box
    ran = {attack_id for attack_id, _ in cascade.member_versions}
    assert ("square-linf-v1" in ran) is black_box
    attack = AdaptiveWorstCase(0.1, "linf", **{k: v for k, v in cascade.attack_kwargs.items() if k != "norm"})
    assert any(type(m).__name__ == "Square" for m in attack.members) is black_box
