"""Carlini-Wagner L2 (2017): minimise ||delta||^2 + c * max(z_y - max_{i != y} z_i + kappa, 0) in
tanh space with Adam, with a binary search over c per example. A logit-space, minimum-norm attack —
the one that broke defensive distillation. It is unbounded: the workbench runs it once per defense
and counts an example as broken at eps only if its smallest adversarial perturbation fits in eps."""

from __future__ import annotations

import math

import torch

from attacks.base import Attack, Victim, perturbation_norm
from bench.registry import register_attack


@register_attack(
    "cw-l2-v1",
    family="gradient",
    norm="l2",
    bounded=False,
    kwargs={"steps": 30, "search_steps": 4, "initial_const": 1.0, "lr": 0.05, "confidence": 0.0, "bpda": False},
    dataset_kwargs={
        "mnist": {"steps": 1000, "search_steps": 9, "lr": 0.01},
        "cifar10": {"steps": 1000, "search_steps": 9, "lr": 0.01, "initial_const": 0.01},
    },
    description="Carlini-Wagner L2: margin loss in tanh space, binary search over the constant (minimum norm)",
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

    def minimal(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model = victim.differentiable(self.bpda)
        n = len(x)
        w_start = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        const = torch.full((n,), self.initial_const, device=x.device, dtype=x.dtype)
        lower = torch.zeros_like(const)
        upper = torch.full_like(const, math.inf)
        best_norm = torch.full_like(const, math.inf)
        best = x.clone()
        shape = (-1, *([1] * (x.dim() - 1)))
        for _ in range(self.search_steps):
            w = w_start.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([w], lr=self.lr)
            succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
            for _ in range(self.steps):
                with torch.enable_grad():
                    candidate = (torch.tanh(w) + 1) / 2
                    logits = model(candidate)
                    true = logits.gather(1, y[:, None]).squeeze(1)
                    other = logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values
                    margin = (true - other + self.confidence).clamp_min(0)
                    distance = (candidate - x).flatten(1).pow(2).sum(dim=1)
                    loss = (distance + const * margin).sum()
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
            upper = torch.where(succeeded, torch.minimum(upper, const), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, const))
            const = torch.where(torch.isinf(upper), const * 10, (lower + upper) / 2)
        return best.clamp(0, 1)
