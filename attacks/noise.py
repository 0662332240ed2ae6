"""Random-noise baseline: many uniform draws inside the eps-ball; an example counts as broken if
any draw misclassifies it. A sanity floor for every other attack — if noise beats the white-box
attacks on a defense, those attacks are being fooled."""

from __future__ import annotations

import torch

from attacks.base import Attack, Victim, clip_to_threat, perturbation_norm
from bench.foundation.registry import register_attack


def uniform_in_ball(x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """A point drawn uniformly from the eps-ball around each example (then clipped to the box)."""
    if norm == "linf":
        delta = (torch.rand_like(x) * 2 - 1) * eps
    else:
        direction = torch.randn_like(x)
        direction = direction / perturbation_norm(direction, "l2").clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        dims = x[0].numel()
        radius = eps * torch.rand(len(x), device=x.device, dtype=x.dtype) ** (1.0 / dims)
        delta = direction * radius.view(-1, *([1] * (x.dim() - 1)))
    return clip_to_threat(x, x + delta, norm, eps)


class RandomNoise(Attack):
    def __init__(self, eps: float, norm: str = "linf", draws: int = 20) -> None:
        super().__init__(eps)
        if draws < 1:
            raise ValueError("draws must be >= 1")
        self.norm, self.draws = norm, int(draws)

    def max_passes_per_example(self) -> tuple[int, int]:
        return self.draws, 0

    def budget_overrides(self) -> dict[str, int | None]:
        return {"queries": self.draws}

    def generate(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        result = x.clone()
        alive = torch.arange(len(x), device=x.device)
        for _ in range(self.draws):
            if len(alive) == 0:
                break
            noisy = uniform_in_ball(x[alive], self.norm, self.eps)
            with torch.no_grad():
                wrong = victim.model(noisy).argmax(dim=1) != y[alive]
            result[alive[wrong]] = noisy[wrong]
            alive = alive[~wrong]
        return result


for _norm in ("linf", "l2"):
    register_attack(
        f"noise-{_norm}-v1",
        family="noise",
        norm=_norm,
        variant={"norm": _norm},
        dataset_kwargs=dict.fromkeys(("mnist", "fashion-mnist", "cifar10"), {}),  # draws do not scale with the image
        description=f"Random noise, {_norm}: 20 uniform draws inside the eps-ball; broken if any draw misclassifies",
    )(RandomNoise)
