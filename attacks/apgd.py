"""APGD (Croce & Hein 2020): PGD without a step size to tune. The step starts at 2·eps and is halved
at checkpoints when progress stalls (too few loss increases since the last checkpoint, or no new
best loss at an unchanged step), restarting from the best point found; updates carry momentum 0.75.
With the cross-entropy loss (APGD-CE) or the scale-free DLR loss (APGD-DLR), Linf and L2.

Batched and on the device; examples leave the batch the moment they are misclassified, restarts run
only on examples still robust."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from attacks.base import (
    Attack,
    Victim,
    clip_to_threat,
    input_gradient,
    loss_function,
    predict,
    random_start,
    steepest_ascent,
)
from bench.foundation.registry import register_attack

PUBLISHED = {
    "mnist": {"steps": 100},
    "fashion-mnist": {"steps": 100},
    "cifar10": {"steps": 100},
}

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits, labels, positions of the examples in the attacked batch) -> per-example loss."""


def checkpoints(steps: int) -> list[int]:
    """Iterations where the step size may be halved: p0 = 0, p1 = 0.22, p_{j+1} = p_j +
    max(p_j - p_{j-1} - 0.03, 0.06), scaled to the budget (Croce & Hein 2020, section 3.2).

    In whole hundredths, so that 0.57 x 100 is 57 and not ceil(57.000000000000007) = 58."""
    points, previous, current = [], 0, 22
    while current <= 100:
        points.append(current)
        previous, current = current, current + max(current - previous - 3, 6)
    return sorted({-(-p * steps // 100) for p in points if -(-p * steps // 100) < steps})


def halve_step(
    increases: torch.Tensor,
    steps_since: int,
    rho: float,
    halved_last_time: torch.Tensor,
    best_loss: torch.Tensor,
    best_at_last_checkpoint: torch.Tensor,
) -> torch.Tensor:
    """Per example, whether to halve the step at a checkpoint (Croce & Hein 2020, conditions 1 and 2):
    the loss rose in fewer than a fraction ``rho`` of the steps since the last checkpoint, or the
    step was not halved there and the best loss has not improved since."""
    stalled = increases < rho * steps_since
    unchanged = ~halved_last_time & (best_loss <= best_at_last_checkpoint)
    return stalled | unchanged


class APGD(Attack):
    def __init__(
        self,
        eps: float,
        norm: str = "linf",
        loss: str = "ce",
        steps: int = 25,
        restarts: int = 1,
        rho: float = 0.75,
        momentum: float = 0.75,
        bpda: bool = False,
    ) -> None:
        super().__init__(eps)
        if steps < 1 or restarts < 1:
            raise ValueError("steps and restarts must be >= 1")
        self.norm = norm
        self.loss_name = loss
        self.steps, self.restarts = int(steps), int(restarts)
        self.rho, self.momentum, self.bpda = float(rho), float(momentum), bool(bpda)
        self.checkpoints = set(checkpoints(self.steps))

    def runs(self) -> int:
        return self.restarts

    def max_passes_per_example(self) -> tuple[int, int]:
        return (self.steps + 1) * self.runs(), self.steps * self.runs()

    def loss_for(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, run: int) -> Loss:
        plain = loss_function(self.loss_name)
        return lambda logits, labels, positions: plain(logits, labels)

    def generate(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._all_runs(victim, x, y)[0]

    def _all_runs(
        self, victim: Victim, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every run in turn on the examples still robust: (points, fooled, each example's highest
        loss over its runs, the run that reached it)."""
        best = x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        closest = torch.full((len(x),), -math.inf, device=x.device, dtype=x.dtype)
        closest_run = torch.zeros(len(x), dtype=torch.long, device=x.device)
        for run in range(self.runs()):
            todo = (~fooled).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            loss = self.loss_for(victim, x, y, run)
            found_x, found, reached = self._one_run(
                victim, x[todo], y[todo], lambda lg, lb, pos, loss=loss, todo=todo: loss(lg, lb, todo[pos])
            )
            best[todo] = found_x
            fooled[todo] = found
            nearer = reached > closest[todo]
            closest[todo[nearer]] = reached[nearer]
            closest_run[todo[nearer]] = run
        return best, fooled, closest, closest_run

    def _step(self, x: torch.Tensor, point: torch.Tensor, grad: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        size = eta.view(-1, *([1] * (x.dim() - 1)))
        return clip_to_threat(x, point + size * steepest_ascent(grad, self.norm), self.norm, self.eps)

    def _one_run(
        self, victim: Victim, x: torch.Tensor, y: torch.Tensor, loss: Loss
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One run from a random start: (points, fooled, best loss reached; +inf where fooled)."""
        model = victim.differentiable(self.bpda)
        n = len(x)
        result = x.clone()
        fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
        reached = torch.full((n,), math.inf, device=x.device, dtype=x.dtype)
        # State of the examples still running, indexed by `alive` (positions in this batch).
        alive = torch.arange(n, device=x.device)
        current = random_start(x, self.norm, self.eps, on_sphere=True)  # Croce & Hein start at radius eps
        previous = current.clone()
        eta = torch.full((n,), 2.0 * self.eps, device=x.device, dtype=x.dtype)
        best_loss = torch.full((n,), -math.inf, device=x.device, dtype=x.dtype)
        best_point, best_grad = current.clone(), torch.zeros_like(x)
        last_loss = torch.full((n,), -math.inf, device=x.device, dtype=x.dtype)
        increases = torch.zeros(n, device=x.device)
        checkpoint_best = best_loss.clone()
        reduced_since = torch.ones(n, dtype=torch.bool, device=x.device)
        last_checkpoint = 0
        x_run, y_run = x, y  # x[alive], y[alive], re-gathered only when examples leave
        for k in range(self.steps):
            grad, values, logits = input_gradient(
                model, current, y_run, lambda lg, lb, alive=alive: loss(lg, lb, alive)
            )
            wrong = logits.argmax(dim=1) != y_run
            if wrong.any():
                result[alive[wrong]] = current[wrong]
                fooled[alive[wrong]] = True
                keep = ~wrong
                alive, current, previous, grad, values = (
                    alive[keep],
                    current[keep],
                    previous[keep],
                    grad[keep],
                    values[keep],
                )
                eta, best_loss, best_point, best_grad = eta[keep], best_loss[keep], best_point[keep], best_grad[keep]
                last_loss, increases = last_loss[keep], increases[keep]
                checkpoint_best, reduced_since = checkpoint_best[keep], reduced_since[keep]
                if len(alive) == 0:
                    return result, fooled, reached
                x_run, y_run = x[alive], y[alive]
            increases += (values > last_loss).float()
            last_loss = values
            better = values > best_loss
            best_loss = torch.where(better, values, best_loss)
            per_example = better.view(-1, *([1] * (x.dim() - 1)))
            best_point = torch.where(per_example, current, best_point)
            best_grad = torch.where(per_example, grad, best_grad)
            if k in self.checkpoints:
                halve = halve_step(increases, k - last_checkpoint, self.rho, reduced_since, best_loss, checkpoint_best)
                eta = torch.where(halve, eta / 2, eta)
                current[halve], grad[halve] = best_point[halve], best_grad[halve]
                reduced_since = halve
                checkpoint_best, increases, last_checkpoint = best_loss.clone(), torch.zeros_like(increases), k
            target = self._step(x_run, current, grad, eta)
            if k == 0:
                following = target
            else:
                mixed = current + self.momentum * (target - current) + (1 - self.momentum) * (current - previous)
                following = clip_to_threat(x_run, mixed, self.norm, self.eps)
            previous, current = current, following
        wrong = predict(victim.model, current) != y_run
        result[alive] = torch.where(wrong.view(-1, *([1] * (x.dim() - 1))), current, best_point)
        fooled[alive] = wrong
        reached[alive] = torch.where(wrong, math.inf, best_loss)
        return result, fooled, reached


for _norm in ("linf", "l2"):
    for _loss, _what in (("ce", "cross-entropy"), ("dlr", "DLR (scale-free logit ratio)")):
        register_attack(
            f"apgd-{_loss}-{_norm}-v1",
            family="gradient",
            norm=_norm,
            variant={"norm": _norm, "loss": _loss},
            dataset_kwargs=PUBLISHED,
            description=f"APGD, {_norm}, {_what}: step-size schedule, momentum, best point (Croce & Hein 2020)",
        )(APGD)
