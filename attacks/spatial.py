"""Spatial attack (Engstrom et al. 2019): the worst case over a grid of small rotations and
translations — a threat model no Lp ball describes, so no defense in the matrix is trained for it.
eps is the largest rotation in degrees; shifts go up to ``max_shift`` of the image side."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from attacks.base import Attack, Victim
from bench.foundation.registry import register_attack


def transform(x: torch.Tensor, degrees: float, shift_x: float, shift_y: float) -> torch.Tensor:
    """Rotate by ``degrees`` and shift by fractions of the image, bilinear, zero padding, batched."""
    angle = math.radians(degrees)
    theta = torch.tensor(
        [[math.cos(angle), -math.sin(angle), 2 * shift_x], [math.sin(angle), math.cos(angle), 2 * shift_y]],
        device=x.device,
        dtype=x.dtype,
    ).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)


class Spatial(Attack):
    norm = "spatial"

    def __init__(self, eps: float, rotations: int = 5, shifts: int = 3, max_shift: float = 0.03) -> None:
        super().__init__(eps)
        if rotations < 1 or shifts < 1 or not 0 <= max_shift < 0.5:
            raise ValueError("rotations and shifts must be >= 1, max_shift in [0, 0.5)")
        angles = torch.linspace(-eps, eps, rotations).tolist() if rotations > 1 else [0.0]
        offsets = torch.linspace(-max_shift, max_shift, shifts).tolist() if shifts > 1 else [0.0]
        # Identity first, then by size: a correctly classified example is attacked by the rest.
        grid = [(a, dx, dy) for a in angles for dx in offsets for dy in offsets]
        self.grid = sorted(grid, key=lambda t: (abs(t[0]) + abs(t[1]) + abs(t[2]), t))

    def max_passes_per_example(self) -> tuple[int, int]:
        return len(self.grid), 0

    def budget_overrides(self) -> dict[str, int | None]:
        return {"queries": len(self.grid)}  # rotations x shifts x shifts

    def generate(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        result = x.clone()
        alive = torch.arange(len(x), device=x.device)
        for degrees, dx, dy in self.grid:
            if len(alive) == 0:
                break
            moved = transform(x[alive], degrees, dx, dy)
            with torch.no_grad():
                wrong = victim.model(moved).argmax(dim=1) != y[alive]
            result[alive[wrong]] = moved[wrong]
            alive = alive[~wrong]
        return result


register_attack(
    "spatial-v1",
    family="decision-based",
    norm="spatial",
    dataset_kwargs={
        "mnist": {"max_shift": 0.1},
        "fashion-mnist": {"max_shift": 0.1},
        "cifar10": {"rotations": 31, "shifts": 5, "max_shift": 0.1},
    },
    description="Spatial: worst case over rotations up to eps degrees and small shifts (grid search)",
)(Spatial)
