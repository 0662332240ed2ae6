"""APGD-T (Croce & Hein 2020): APGD with the targeted DLR loss, run once per target class — the
classes the model ranks highest after the true one on the clean input — on the examples that are
still robust. AutoAttack's strongest white-box component; the targeted loss sidesteps masking of the
untargeted margin.

``retries`` spends extra runs where they pay: after every target has had its run, the fraction
``retry_fraction`` of the still-robust examples whose best run came closest to fooling the model
(highest targeted DLR loss) get ``retries`` more runs from new random starts, each against the target
of that closest run. Examples a single run leaves on the boundary are broken by one start in a few;
examples far from it are not, so the retries skip them."""

from __future__ import annotations

import math

import torch

from attacks.apgd import APGD, PUBLISHED, Loss
from attacks.base import Victim, targeted_dlr_loss
from bench.foundation.registry import register_attack


class APGDTargeted(APGD):
    def __init__(
        self,
        eps: float,
        norm: str = "linf",
        targets: int = 2,
        steps: int = 25,
        restarts: int = 1,
        rho: float = 0.75,
        momentum: float = 0.75,
        bpda: bool = False,
        retries: int = 0,
        retry_fraction: float = 0.2,
    ) -> None:
        super().__init__(
            eps, norm=norm, loss="dlr", steps=steps, restarts=restarts, rho=rho, momentum=momentum, bpda=bpda
        )
        if targets < 1:
            raise ValueError("targets must be >= 1")
        if retries < 0 or not 0 < retry_fraction <= 1:
            raise ValueError("retries must be >= 0 and retry_fraction in (0, 1]")
        self.targets = int(targets)
        self.retries, self.retry_fraction = int(retries), float(retry_fraction)
        self._ranking: torch.Tensor | None = None

    def runs(self) -> int:
        """One run per target and restart; never more targets than there are wrong classes."""
        targets = self.targets if self._ranking is None else min(self.targets, self._ranking.shape[1] - 1)
        return targets * self.restarts

    def max_passes_per_example(self) -> tuple[int, int]:
        forwards, backwards = super().max_passes_per_example()
        return forwards + 1 + (self.steps + 1) * self.retries, backwards + self.steps * self.retries

    def budget_overrides(self) -> dict[str, int | None]:
        return {"restarts": self.runs() + self.retries}  # one APGD run per target and restart, plus retries

    def generate(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = victim.model(x)
        self._ranking = logits.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)
        best, fooled, closest, closest_run = self._all_runs(victim, x, y)
        robust = (~fooled).nonzero().squeeze(1)
        if self.retries == 0 or len(robust) == 0:
            return best
        chosen = robust[closest[robust].topk(math.ceil(self.retry_fraction * len(robust))).indices]
        target = self._ranking[chosen, closest_run[chosen] // self.restarts]
        for _ in range(self.retries):
            if len(chosen) == 0:
                break
            found_x, found, _ = self._one_run(
                victim,
                x[chosen],
                y[chosen],
                lambda lg, lb, pos, target=target: targeted_dlr_loss(lg, lb, target[pos]),
            )
            best[chosen[found]] = found_x[found]
            chosen, target = chosen[~found], target[~found]
        return best

    def loss_for(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, run: int) -> Loss:
        assert self._ranking is not None
        target = self._ranking[:, run // self.restarts]
        return lambda logits, labels, positions: targeted_dlr_loss(logits, labels, target[positions])


for _norm in ("linf", "l2"):
    register_attack(
        f"apgd-t-{_norm}-v1",
        family="gradient",
        norm=_norm,
        variant={"norm": _norm},
        dataset_kwargs={name: {**budget, "targets": 9} for name, budget in PUBLISHED.items()},
        description=f"APGD-T, {_norm}: targeted DLR over the top-ranked wrong classes (Croce & Hein 2020)",
    )(APGDTargeted)
