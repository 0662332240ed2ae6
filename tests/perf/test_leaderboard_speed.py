"""`robustmatrix leaderboard` on a database the size of the default matrix must take under 5 seconds."""

from __future__ import annotations

import numpy as np

from tests.conftest import run_cli
from tests.leaderboard_data import FakeDefense, write_database

DEFENSES, ATTACKS, EPS, EXAMPLES = 14, 25, (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4), 300
TARGET_SECONDS = 5.0


def test_leaderboard_of_a_default_sized_matrix(benchmark, tmp_path):
    rng = np.random.RandomState(0)
    defenses = [
        FakeDefense(
            f"defense-{d}-v1",
            {(f"attack-{a}-v1", eps): rng.rand(EXAMPLES) < 0.9 - eps for a in range(ATTACKS) for eps in EPS},
            clean=0.95,
            trained_against=[{"norm": "linf", "eps": 0.2, "attack": "pgd"}] if d % 2 else [],
        )
        for d in range(DEFENSES)
    ]
    db = write_database(tmp_path / "r.db", defenses, n=EXAMPLES)

    def build() -> None:
        result = run_cli("leaderboard", "--db", str(db), "--out", str(tmp_path / "out"))
        assert result.code == 0, result.stderr

    benchmark.pedantic(build, rounds=1 if benchmark.disabled else 3, iterations=1)
    if not benchmark.disabled:
        assert benchmark.stats.stats.max < TARGET_SECONDS
