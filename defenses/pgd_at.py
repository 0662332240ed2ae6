"""Madry et al. 2018 adversarial training: minimise the loss on PGD examples crafted against the
current model at every step (from a random start, last iterate, no early stopping).

Registered twice, as the same code with a different norm: Linf and L2. Comparing the two on the
leaderboard is the simplest test of whether robustness carries over between threat models.
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
    train,
    training_kwargs,
    with_training_defaults,
)

LINF_KWARGS, LINF_DATASET_KWARGS = with_training_defaults(
    {"norm": "linf", "eps": 0.2, "steps": 7, "rel_step": 2.5 / 7},
    {
        "mnist": {"eps": 0.3, "steps": 40, "rel_step": 0.01 / 0.3},
        "mnist-t10k": {"eps": 0.3, "steps": 40, "rel_step": 0.01 / 0.3},
        "fashion-mnist": {"eps": 0.1, "steps": 40, "rel_step": 0.01 / 0.1},
        "cifar10": {"eps": 8 / 255, "steps": 10, "rel_step": 0.25},
    },
)

# L2: eps 2.0 with 40 steps of 0.1 on MNIST-sized images (the MNIST-Challenge-style L2 setting);
# Rice et al. 2020 on CIFAR-10: eps 128/255, 10 steps of 15/255.
L2_KWARGS, L2_DATASET_KWARGS = with_training_defaults(
    {"norm": "l2", "eps": 1.5, "steps": 7, "rel_step": 2.5 / 7},
    {
        "mnist": {"eps": 2.0, "steps": 40, "rel_step": 0.05},
        "mnist-t10k": {"eps": 2.0, "steps": 40, "rel_step": 0.05},
        "fashion-mnist": {"eps": 1.5, "steps": 40, "rel_step": 0.05},
        "cifar10": {"eps": 128 / 255, "steps": 10, "rel_step": 15 / 128},
    },
)


@register_defense(
    "pgd-at-l2-v1",
    trained_against=(NormKwargThreat("l2", "pgd"),),
    kwargs=L2_KWARGS,
    dataset_kwargs=L2_DATASET_KWARGS,
    description="PGD adversarial training, L2 (Madry et al. 2018)",
)
@register_defense(
    "pgd-at-linf-v1",
    trained_against=(NormKwargThreat("linf", "pgd"),),
    kwargs=LINF_KWARGS,
    dataset_kwargs=LINF_DATASET_KWARGS,
    description="PGD adversarial training, Linf (Madry et al. 2018)",
)
class PGDAdversarialTraining(Defense):
    def __init__(self, norm: str, eps: float, steps: int, rel_step: float, **kwargs: Any) -> None:
        check_pgd_kwargs("PGD training", norm, eps, steps, rel_step)
        self.attack = PGD(eps, norm=norm, steps=steps, rel_step=rel_step, early_stop=False)
        self.train_kwargs = training_kwargs(kwargs)

    def fit(self, model: nn.Module, data: TrainData, ctx: TrainContext) -> None:
        def adversarial_loss(counted: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
            with evaluating(counted):
                x_adv = self.attack(Victim(counted, data.num_classes), x, y)
            return F.cross_entropy(counted(x_adv), y)

        train(model, data, ctx, adversarial_loss, **self.train_kwargs)
