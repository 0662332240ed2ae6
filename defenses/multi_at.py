"""Adversarial training against several perturbation types at once (Tramèr & Boneh 2019): at every
step, PGD examples are crafted in *both* the Linf and the L2 ball, and the model minimises

- ``max``: per example, the loss of whichever attack hurt more (the worst case over the union), or
- ``avg``: the mean of the two losses.

Registered twice (same code, one kwarg apart). Each declares both threat models it trained against,
so the leaderboard can tell seen from unseen cells for it. It costs about twice a PGD-AT run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from attacks.base import Victim
from attacks.pgd import PGD
from bench.foundation.registry import register_defense
from bench.foundation.specs import TrainingThreat
from defenses.base import Defense, TrainContext, TrainData
from defenses.training import check_pgd_kwargs, evaluating, require, train, training_kwargs, with_training_defaults

STRATEGIES = ("max", "avg")


def combine(losses: torch.Tensor, strategy: str) -> torch.Tensor:
    """Per-example losses of shape (attacks, batch) -> the scalar to minimise."""
    if strategy == "max":
        return losses.max(dim=0).values.mean()
    if strategy == "avg":
        return losses.mean()
    raise ValueError(f"unknown multi-perturbation strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")


def _kwargs(strategy: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    # Tramèr & Boneh on MNIST: Linf 0.3 and L2 2.0, 40-step PGD; on CIFAR-10 the usual 8/255 and 128/255.
    mnist = {"eps_linf": 0.3, "eps_l2": 2.0, "steps": 40, "rel_step": 2.5 / 40}
    return with_training_defaults(
        {"strategy": strategy, "eps_linf": 0.2, "eps_l2": 1.5, "steps": 5, "rel_step": 0.5},
        {
            "mnist": mnist,
            "mnist-t10k": mnist,
            "fashion-mnist": {**mnist, "eps_linf": 0.1, "eps_l2": 1.5},
            "cifar10": {"eps_linf": 8 / 255, "eps_l2": 128 / 255, "steps": 10, "rel_step": 0.25},
        },
    )


MAX_KWARGS, MAX_DATASET_KWARGS = _kwargs("max")
AVG_KWARGS, AVG_DATASET_KWARGS = _kwargs("avg")
TRAINED_AGAINST = (TrainingThreat("linf", "pgd", "eps_linf"), TrainingThreat("l2", "pgd", "eps_l2"))


@register_defense(
    "multi-at-avg-v1",
    trained_against=TRAINED_AGAINST,
    kwargs=AVG_KWARGS,
    dataset_kwargs=AVG_DATASET_KWARGS,
    description="Adversarial training on Linf and L2 PGD together, mean of the two losses (Tramèr & Boneh 2019)",
)
@register_defense(
    "multi-at-max-v1",
    trained_against=TRAINED_AGAINST,
    kwargs=MAX_KWARGS,
    dataset_kwargs=MAX_DATASET_KWARGS,
    description="Adversarial training on Linf and L2 PGD together, worst attack per example (Tramèr & Boneh 2019)",
)
class MultiPerturbationTraining(Defense):
    def __init__(
        self, strategy: str, eps_linf: float, eps_l2: float, steps: int, rel_step: float, **kwargs: Any
    ) -> None:
        require(
            strategy in STRATEGIES,
            f"multi-perturbation training: strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}",
        )
        check_pgd_kwargs("multi-perturbation training", "linf", eps_linf, steps, rel_step)
        check_pgd_kwargs("multi-perturbation training", "l2", eps_l2, steps, rel_step)
        self.strategy = strategy
        self.attacks = [
            PGD(eps_linf, norm="linf", steps=steps, rel_step=rel_step, early_stop=False),
            PGD(eps_l2, norm="l2", steps=steps, rel_step=rel_step, early_stop=False),
        ]
        self.train_kwargs = training_kwargs(kwargs)

    def fit(self, model: nn.Module, data: TrainData, ctx: TrainContext) -> None:
        def loss(counted: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
            victim = Victim(counted, data.num_classes)
            with evaluating(counted):
                examples = [attack(victim, x, y) for attack in self.attacks]
            losses = torch.stack([F.cross_entropy(counted(x_adv), y, reduction="none") for x_adv in examples])
            return combine(losses, self.strategy)

        train(model, data, ctx, loss, **self.train_kwargs)
