"""Square attack (Andriushchenko et al. 2020): score-based black-box random search. Each query
changes one random square window of the perturbation (its size shrinking on a schedule) and keeps
the change if the margin loss improves. It needs no gradients, so masked gradients do not fool it —
a black-box attack beating the white-box ones is a masking flag on the leaderboard.

Linf follows the paper (windows set to +-eps per channel, vertical-stripe initialisation); L2 makes
the same square-window proposals with Gaussian values, projected back onto the L2 ball."""

from __future__ import annotations

import math

import torch

from attacks.base import Attack, Victim, clip_to_threat, margin_loss, perturbation_norm
from bench.registry import Budget, register_attack

SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
"""Iterations (out of 10,000) at which the window fraction p halves, as in the paper."""


def window_fraction(p_init: float, iteration: int, queries: int) -> float:
    scaled = int(iteration / queries * 10000)
    return p_init / 2 ** sum(scaled > point for point in SCHEDULE)


def random_windows(batch: int, height: int, width: int, side: int, device: torch.device) -> torch.Tensor:
    """A boolean (batch, height, width) mask: one side x side square at a random place per example."""
    top = torch.randint(0, height - side + 1, (batch,), device=device)
    left = torch.randint(0, width - side + 1, (batch,), device=device)
    rows = torch.arange(height, device=device)[None, :]
    cols = torch.arange(width, device=device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
    return in_rows[:, :, None] & in_cols[:, None, :]


class Square(Attack):
    def __init__(self, eps: float, norm: str = "linf", queries: int = 80, p_init: float = 0.3) -> None:
        super().__init__(eps)
        if queries < 1 or not 0 < p_init <= 1:
            raise ValueError("queries must be >= 1 and p_init in (0, 1]")
        self.norm, self.queries, self.p_init = norm, int(queries), float(p_init)

    def max_passes_per_example(self) -> tuple[int, int]:
        return self.queries + 1, 0

    def _initial(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, _, width = x.shape
        if self.norm == "linf":
            stripes = torch.randint(0, 2, (batch, channels, 1, width), device=x.device).to(x.dtype) * 2 - 1
            return clip_to_threat(x, x + self.eps * stripes, self.norm, self.eps)
        direction = torch.randn_like(x)
        direction = direction / perturbation_norm(direction, "l2").clamp_min(1e-12).view(-1, 1, 1, 1)
        return clip_to_threat(x, x + self.eps * direction, self.norm, self.eps)

    def _propose(self, x: torch.Tensor, current: torch.Tensor, iteration: int) -> torch.Tensor:
        batch, channels, height, width = x.shape
        p = window_fraction(self.p_init, iteration, self.queries)
        side = max(1, min(height, width, int(round(math.sqrt(p * height * width)))))
        window = random_windows(batch, height, width, side, x.device)[:, None]
        if self.norm == "linf":
            values = (torch.randint(0, 2, (batch, channels, 1, 1), device=x.device).to(x.dtype) * 2 - 1) * self.eps
            delta = torch.where(window, values.expand_as(x), current - x)
        else:
            noise = torch.randn_like(x) * window
            noise = noise / perturbation_norm(noise, "l2").clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = current - x + self.eps * math.sqrt(p) * noise
        return clip_to_threat(x, x + delta, self.norm, self.eps)

    def generate(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        result = self._initial(x)
        with torch.no_grad():
            loss = -margin_loss(victim.model(result), y)  # > 0 while correctly classified; minimise
        alive = (loss > 0).nonzero().squeeze(1)
        for iteration in range(self.queries):
            if len(alive) == 0:
                break
            proposal = self._propose(x[alive], result[alive], iteration)
            with torch.no_grad():
                proposed_loss = -margin_loss(victim.model(proposal), y[alive])
            better = proposed_loss < loss[alive]
            result[alive[better]] = proposal[better]
            loss[alive[better]] = proposed_loss[better]
            alive = alive[loss[alive] > 0]
        return result


for _norm, _p in (("linf", 0.3), ("l2", 0.3)):
    register_attack(
        f"square-{_norm}-v1",
        family="score-based",
        norm=_norm,
        budget_defaults=Budget(restarts=1),
        kwargs={"norm": _norm, "queries": 80, "p_init": _p},
        dataset_kwargs={"mnist": {"queries": 5000, "p_init": 0.8}, "cifar10": {"queries": 5000, "p_init": 0.8}},
        description=f"Square attack, {_norm}: score-based random search, square windows (Andriushchenko et al. 2020)",
    )(Square)
