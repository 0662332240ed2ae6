"""The oracle test: the escalating worst case is never weaker than AutoAttack itself.

On the digits PGD-AT (Linf) and TRADES models at Linf 0.2 and L2 1.0 — the default matrix's
training, budgets and 250 evaluation examples — every attack of the matrix runs, the cascade
escalates on the survivors, and the reference AutoAttack (``version="standard"``) runs beside them
as a matrix attack. The worst case must be at or below AutoAttack's robust accuracy and break every
example AutoAttack breaks (one exception over the four cases allowed: both sides draw randomly).

Only Linf 0.2 and L2 1.0 are in the grid (the default also has smaller eps, whose breaks would carry
over): the check is stricter than the default matrix's. Skips where ``autoattack`` is absent."""

from __future__ import annotations

import pytest

from leaderboard.report import build_report
from tests.conftest import run_cli, write_matrix

pytest.importorskip("autoattack", reason="the reference autoattack is not installed: pip install "
                    "../shared/reference/auto-attack/dist/autoattack-0.1-py3-none-any.whl")  # fmt: skip

ORACLE_MATRIX = """
defenses = ["pgd-at-linf-v1", "trades-linf-v1"]
attacks = ["*", "autoattack-standard-*"]
[eps]
linf = [0.2]
l2 = [1.0]
l1 = []
spatial = []
"""


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    config = write_matrix(root / "oracle.toml", ORACLE_MATRIX)  # laid over the default matrix
    result = run_cli("run", "--config", str(config), "--quiet", cwd=root)
    assert result.code == 0, result.stderr
    (dataset,) = build_report(root / "results" / "robustmatrix.db")["datasets"]
    return dataset


def test_the_worst_case_is_at_or_below_autoattack_and_breaks_what_it_breaks(oracle_run):
    assert oracle_run["n_eval"] == 250
    compared, beyond = 0, 0
    for entry in oracle_run["defenses"]:
        for threat in entry["worst_case_by_threat"]:
            reference = threat["reference"]
            assert reference is not None, f"{entry['defense']} {threat['norm']} {threat['eps']}: no AutoAttack cell"
            where = f"{entry['defense']} at {threat['norm']} {threat['eps']:g}"
            assert threat["value"] <= reference["value"] + 1 / 250, f"{where}: {threat['value']} > {reference['value']}"
            beyond += reference["beyond"]
            compared += 1
    assert compared == 4
    assert beyond <= 1, f"AutoAttack broke {beyond} examples the worst case left robust"
