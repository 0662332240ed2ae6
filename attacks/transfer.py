"""Transfer attack: PGD examples crafted on a surrogate — the undefended `standard` model of the same
dataset and seed — and replayed on the defense. It touches the defense only to be scored, so it
cannot be fooled by the defense's gradients: a transfer attack beating white-box attacks on a
defense is a masking flag."""

from __future__ import annotations

import torch

from attacks.base import Attack, Victim
from attacks.pgd import PGD
from bench.foundation.registry import register_attack


class Transfer(Attack):
    def __init__(self, eps: float, norm: str = "linf", steps: int = 20, restarts: int = 1) -> None:
        super().__init__(eps)
        self.norm = norm
        self.crafter = PGD(eps, norm=norm, steps=steps, restarts=restarts, early_stop=False)

    def max_passes_per_example(self) -> tuple[int, int]:
        # The defense is never queried by the attack (only scored, by the workbench); its cost is
        # the PGD run on the surrogate, whose passes the workbench counts with the cell's.
        return self.crafter.max_passes_per_example()

    def generate(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if victim.surrogate is None:
            raise ValueError("the transfer attack needs a surrogate model (the runner provides standard-v1)")
        return self.crafter(Victim(victim.surrogate, victim.num_classes), x, y)


for _norm in ("linf", "l2"):
    register_attack(
        f"transfer-pgd-{_norm}-v1",
        family="transfer",
        norm=_norm,
        needs_surrogate=True,
        variant={"norm": _norm},
        dataset_kwargs={"mnist": {"steps": 100}, "fashion-mnist": {"steps": 100}, "cifar10": {"steps": 20}},
        description=f"Transfer, {_norm}: PGD on the undefended standard-v1 model, replayed on the defense",
    )(Transfer)
