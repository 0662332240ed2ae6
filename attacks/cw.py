"""Carlini-Wagner L2 (2017): minimise ||delta||^2 + c * max(z_y - max_{i != y} z_i + kappa, 0) with
Adam, with a binary search over c per example. A logit-space, minimum-norm attack — the one that
broke defensive distillation. It is unbounded: the workbench runs it once per defense and counts an
example as broken at eps only if its smallest adversarial perturbation fits in eps.

The box [0, 1] is kept by projection, not by the paper's tanh change of variables: a pixel exactly
at 0 or 1 (most of a digit) starts at w = atanh(+-(1 - 1e-6)) ~ +-7.25, where tanh is flat, and a
short Adam run never moves it. Here delta itself is optimised and projected back into the box after
every step; the learning rate decays (cosine, to a tenth) within each search step so the last
iterates settle on the boundary; and each search step after the first starts from the smallest
adversarial example found so far (the previous iterate where none was found) instead of from x, so
the binary search refines one solution instead of re-finding it."""

from __future__ import annotations

import math

import torch

from attacks.base import Attack, Victim, margin_loss, perturbation_norm
from bench.foundation.registry import register_attack


@register_attack(
    "cw-l2-v1",
    family="gradient",
    norm="l2",
    bounded=False,
    dataset_kwargs={
        "mnist": {"steps": 1000, "search_steps": 9, "lr": 0.01},
        "fashion-mnist": {"steps": 1000, "search_steps": 9, "lr": 0.01},
        "cifar10": {"steps": 1000, "search_steps": 9, "lr": 0.01, "initial_const": 0.01},
    },
    description="Carlini-Wagner L2: logit margin + squared L2 norm, Adam with box projection, binary search "
    "over the constant (minimum norm)",
)
class CarliniWagnerL2(Attack):
    norm = "l2"
    bounded = False

    def __init__(
        self,
        eps: float,
        steps: int = 30,
        search_steps: int = 4,
        initial_const: float = 1.0,
        lr: float = 0.05,
        confidence: float = 0.0,
        bpda: bool = False,
    ) -> None:
        super().__init__(eps)
        if steps < 1 or search_steps < 1 or initial_const <= 0 or lr <= 0:
            raise ValueError("steps and search_steps must be >= 1; initial_const and lr positive")
        self.steps, self.search_steps = int(steps), int(search_steps)
        self.initial_const, self.lr, self.confidence, self.bpda = (
            float(initial_const),
            float(lr),
            float(confidence),
            bool(bpda),
        )

    def max_passes_per_example(self) -> tuple[int, int]:
        return self.steps * self.search_steps, self.steps * self.search_steps

    def budget_overrides(self) -> dict[str, int | None]:
        # Every search step continues the optimisation from the best point so far: one run of
        # steps x search_steps Adam steps.
        return {"steps": self.steps * self.search_steps, "restarts": 1}

    def learning_rate(self, step: int) -> float:
        """Cosine decay from lr to lr / 10 over one search step."""
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / self.steps)))

    def minimal(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model = victim.differentiable(self.bpda)
        n = len(x)
        shape = (-1, *([1] * (x.dim() - 1)))
        const = torch.full((n,), self.initial_const, device=x.device, dtype=x.dtype)
        lower = torch.zeros_like(const)
        upper = torch.full_like(const, math.inf)
        best_norm = torch.full_like(const, math.inf)
        best = x.clone()
        delta = torch.zeros_like(x)
        for search in range(self.search_steps):
            if search > 0:  # warm start: refine the smallest adversarial example found so far
                delta = torch.where(torch.isfinite(best_norm).view(shape), best - x, delta)
            delta = delta.detach().requires_grad_(True)
            optimizer = torch.optim.Adam([delta], lr=self.lr)
            succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
            for step in range(self.steps):
                for group in optimizer.param_groups:
                    group["lr"] = self.learning_rate(step)
                with torch.enable_grad():
                    candidate = x + delta
                    logits = model(candidate)
                    hinge = (self.confidence - margin_loss(logits, y)).clamp_min(0)
                    distance = delta.flatten(1).pow(2).sum(dim=1)
                    loss = (distance + const * hinge).sum()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                with torch.no_grad():
                    wrong = logits.argmax(dim=1) != y
                    size = perturbation_norm(candidate.detach() - x, "l2")
                    improved = wrong & (size < best_norm)
                    best_norm = torch.where(improved, size, best_norm)
                    best = torch.where(improved.view(shape), candidate.detach(), best)
                    succeeded |= wrong
                    delta.copy_((x + delta).clamp(0, 1) - x)  # back into the box
            upper = torch.where(succeeded, torch.minimum(upper, const), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, const))
            const = torch.where(torch.isinf(upper), const * 10, (lower + upper) / 2)
        return best.clamp(0, 1)
