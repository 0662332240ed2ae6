"""AutoAttack itself (Croce & Hein 2020, ``version="standard"``) as a reference attack.

Not one of ours: the reference code, run as is, so that in a matrix its cells sit beside the
harness's own and the leaderboard shows whether our worst case is at or below it. Its family is
``reference``: the leaderboard keeps it out of the worst case (a benchmark cannot grade itself with
the oracle it is checked against) and flags every threat model where it beat the worst case.

The ``autoattack`` package is not on PyPI; install the pinned reference wheel (MIT) with
``pip install ../shared/reference/auto-attack/dist/autoattack-0.1-py3-none-any.whl``."""

from __future__ import annotations

import contextlib
import io
import warnings

import torch

from attacks.base import Attack, Victim
from bench.foundation.errors import RobustMatrixError
from bench.foundation.registry import register_attack

INSTALL_HINT = "pip install ../shared/reference/auto-attack/dist/autoattack-0.1-py3-none-any.whl"
NORM_NAMES = {"linf": "Linf", "l2": "L2"}
SANITY_FORWARDS = 8
"""Forward passes per example AutoAttack spends before attacking: the clean accuracy, five passes of
its randomness check, one of its output-range check and one of its dynamic-defense check."""
STANDARD_PASSES = {
    # (forwards, backwards) per example at most, stage by stage, from the reference code:
    "apgd-ce": (102, 101),  # 100 iterations, one restart, plus the start and the last check
    "apgd-t": (9 * 102, 9 * 101),  # 9 target classes
    "fab-t": (9 * 204, 9 * 102),  # 9 targets x 100 iterations: a gradient and a check per iteration
    "square": (5002, 0),  # 5000 queries, plus the start
}


def autoattack_available() -> bool:
    try:
        import autoattack  # noqa: F401
    except ImportError:
        return False
    return True


class AutoAttackStandard(Attack):
    """Runs the reference ``AutoAttack(version="standard")`` on the batch it is given, seeded."""

    def __init__(self, eps: float, norm: str = "linf", seed: int = 0) -> None:
        super().__init__(eps)
        if norm not in NORM_NAMES:
            raise ValueError(f"AutoAttack standard works in linf or l2 here, not {norm!r}")
        if not autoattack_available():
            raise RobustMatrixError(f"autoattack-standard needs the reference autoattack package: {INSTALL_HINT}")
        self.norm, self.seed = norm, int(seed)

    def max_passes_per_example(self) -> tuple[int, int]:
        forwards = SANITY_FORWARDS + sum(f for f, _ in STANDARD_PASSES.values())
        return forwards, sum(b for _, b in STANDARD_PASSES.values())

    def budget_overrides(self) -> dict[str, int | None]:
        return {"steps": 100, "restarts": 1 + 9 + 9, "queries": 5000}

    def generate(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from autoattack import AutoAttack

        attack = AutoAttack(
            victim.model,
            norm=NORM_NAMES[self.norm],
            eps=self.eps,
            version="standard",
            seed=self.seed,
            verbose=False,
            device=x.device,
        )
        # Its sanity checks warn and print; the harness has its own probes and flags.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            x_adv = attack.run_standard_evaluation(x, y, bs=len(x))
        # The reference clips to the box but its L2 projection can overshoot eps by float error.
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            size = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = delta * (self.eps / size).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))
        return (x + delta).clamp(0, 1)


for _norm in ("linf", "l2"):
    register_attack(
        f"autoattack-standard-{_norm}-v1",
        family="reference",
        norm=_norm,
        variant={"norm": _norm},
        dataset_kwargs=dict.fromkeys(("mnist", "fashion-mnist", "cifar10"), {}),  # its budgets are its own
        description=f"AutoAttack standard, {_norm} (the reference code, Croce & Hein 2020): the oracle our "
        "worst case is checked against; kept out of the worst case",
    )(AutoAttackStandard)
