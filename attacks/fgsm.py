"""FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps. A single-step baseline whose
beating an iterative attack is a classic sign of gradient masking."""

from __future__ import annotations

import torch

from attacks.base import Attack, Victim, clip_to_threat, input_gradient, loss_function
from bench.foundation.registry import register_attack
from bench.foundation.specs import Budget


@register_attack(
    "fgsm-linf-v1",
    family="gradient",
    norm="linf",
    budget_defaults=Budget(steps=1, restarts=1),
    dataset_kwargs=dict.fromkeys(("mnist", "fashion-mnist", "cifar10"), {}),  # one step is one step everywhere
    description="Fast gradient sign method: one step of size eps (cross-entropy)",
)
class FGSM(Attack):
    norm = "linf"

    def __init__(self, eps: float, loss: str = "ce", eot_samples: int = 1, bpda: bool = False) -> None:
        super().__init__(eps)
        self.loss = loss_function(loss)
        self.eot_samples = int(eot_samples)
        self.bpda = bool(bpda)

    def max_passes_per_example(self) -> tuple[int, int]:
        return self.eot_samples, self.eot_samples

    def generate(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        grad, _, _ = input_gradient(victim.differentiable(self.bpda), x, y, self.loss, self.eot_samples)
        return clip_to_threat(x, x + self.eps * grad.sign(), self.norm, self.eps)
