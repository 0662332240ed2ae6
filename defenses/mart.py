"""MART (Wang et al. 2020, "Improving adversarial robustness requires revisiting misclassified
examples"): a boosted cross-entropy on PGD examples plus a KL term weighted toward the examples the
model still misclassifies (or barely classifies) on clean inputs.

    BCE(p(x'), y) = -log p_y(x') - log(1 - max_{k≠y} p_k(x'))
    loss = BCE + β · KL(p(x) ‖ p(x')) · (1 - p_y(x))

The inner maximization is cross-entropy PGD, as in the paper; we start it from a uniform random
point of the ball (MART's code starts at x + 0.001·N(0, I); both are PGD-CE).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from attacks.base import Victim
from attacks.pgd import PGD
from bench.foundation.registry import register_defense
from defenses.base import Defense, TrainContext, TrainData
from defenses.training import (
    NormKwargThreat,
    check_pgd_kwargs,
    evaluating,
    is_number,
    require,
    train,
    training_kwargs,
    with_training_defaults,
)

PROBABILITY_FLOOR = 1e-12


def mart_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    probs_adv = F.softmax(logits_adv, dim=1)
    others = probs_adv.scatter(1, y[:, None], 0.0)
    runner_up = others.max(dim=1).values
    boosted_ce = F.cross_entropy(logits_adv, y, reduction="none") - torch.log(
        (1.0 - runner_up).clamp_min(PROBABILITY_FLOOR)
    )
    probs_clean = F.softmax(logits_clean, dim=1)
    kl = (probs_clean * (torch.log(probs_clean.clamp_min(PROBABILITY_FLOOR)) - F.log_softmax(logits_adv, dim=1))).sum(
        dim=1
    )
    true_clean = probs_clean.gather(1, y[:, None]).squeeze(1)
    return (boosted_ce + beta * kl * (1.0 - true_clean)).mean()


_MNIST = {"eps": 0.3, "steps": 40, "rel_step": 0.01 / 0.3}
KWARGS, DATASET_KWARGS = with_training_defaults(
    {"norm": "linf", "eps": 0.2, "steps": 5, "rel_step": 0.5, "beta": 6.0},
    {
        "mnist": _MNIST,
        "mnist-t10k": _MNIST,
        "fashion-mnist": {**_MNIST, "eps": 0.1, "rel_step": 0.1},
        # Wang et al. on CIFAR-10: eps 8/255, 10 steps of 2/255, β = 6 (the schedule is the shared one).
        "cifar10": {"eps": 8 / 255, "steps": 10, "rel_step": 0.25, "beta": 6.0},
    },
)


@register_defense(
    "mart-linf-v1",
    trained_against=(NormKwargThreat("linf", "pgd"),),
    kwargs=KWARGS,
    dataset_kwargs=DATASET_KWARGS,
    description="MART: boosted cross-entropy on PGD examples + misclassification-weighted KL (Wang et al. 2020)",
)
class MART(Defense):
    def __init__(self, norm: str, eps: float, steps: int, rel_step: float, beta: float, **kwargs: Any) -> None:
        require(is_number(beta) and beta >= 0, f"MART: beta must be >= 0, got {beta!r}")
        check_pgd_kwargs("MART", norm, eps, steps, rel_step)
        self.attack = PGD(eps, norm=norm, steps=steps, rel_step=rel_step, early_stop=False)
        self.beta = float(beta)
        self.train_kwargs = training_kwargs(kwargs)

    def fit(self, model: nn.Module, data: TrainData, ctx: TrainContext) -> None:
        def loss(counted: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
            with evaluating(counted):
                x_adv = self.attack(Victim(counted, data.num_classes), x, y)
            return mart_loss(counted(x), counted(x_adv), y, self.beta)

        train(model, data, ctx, loss, **self.train_kwargs)
