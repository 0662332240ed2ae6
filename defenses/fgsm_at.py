"""Single-step adversarial training: minimise the loss on one-step FGSM examples.

Two registrations of the same code, because the difference between them is the point:

- ``fgsm-at-linf-v1`` starts from the clean input with a step of eps (Goodfellow et al. 2015, trained
  on the adversarial examples alone as in Wong et al.'s baseline). It is the variant known for
  catastrophic overfitting: the model learns to make the one-step gradient useless, FGSM accuracy
  stays high while PGD accuracy collapses.
- ``fast-at-linf-v1`` starts from a uniformly random point of the ball and steps 1.25·eps before
  projecting back (Wong, Rice & Kolter 2020, "Fast is better than free"), which avoids that failure
  at the cost of one forward/backward pass per example, like FGSM.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from attacks.base import ce_loss, clip_to_threat, input_gradient, random_start, steepest_ascent
from bench.foundation.registry import register_defense
from defenses.base import Defense, TrainContext, TrainData
from defenses.training import (
    TRAINING_NORMS,
    NormKwargThreat,
    evaluating,
    is_number,
    require,
    train,
    training_kwargs,
    with_training_defaults,
)


def fgsm_examples(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, step: float, from_random: bool
) -> torch.Tensor:
    """One steepest-ascent step of size ``step`` on the cross-entropy, from ``x`` or from a random
    point of the eps-ball, projected back onto the ball and the image box."""
    start = random_start(x, norm, eps) if from_random else x
    grad, _, _ = input_gradient(model, start, y, ce_loss)
    return clip_to_threat(x, start + step * steepest_ascent(grad, norm), norm, eps)


FGSM_KWARGS, FGSM_DATASET_KWARGS = with_training_defaults(
    {"norm": "linf", "eps": 0.2, "rel_step": 1.0, "random_start": False},
    {
        "mnist": {"eps": 0.3},
        "mnist-t10k": {"eps": 0.3},
        "fashion-mnist": {"eps": 0.1},
        "cifar10": {"eps": 8 / 255},
    },
)

# Wong et al. 2020: MNIST eps 0.3, step 0.375, 10 epochs of Adam with a cyclic learning rate up to
# 5e-3 (batch 100); CIFAR-10 eps 8/255, step 10/255, 15 epochs of SGD, cyclic learning rate up to 0.2.
# The cyclic schedule is part of the method; digits use the MNIST one (over the usual 20 epochs).
_FAST_MNIST = {"eps": 0.3, "epochs": 10, "batch_size": 100, "optimizer": "adam", "lr": 5e-3, "schedule": "cyclic"}
FAST_KWARGS, FAST_DATASET_KWARGS = with_training_defaults(
    {"norm": "linf", "eps": 0.2, "rel_step": 1.25, "random_start": True, "lr": 5e-3, "schedule": "cyclic"},
    {
        "mnist": _FAST_MNIST,
        "mnist-t10k": _FAST_MNIST,
        "fashion-mnist": {**_FAST_MNIST, "eps": 0.1},
        "cifar10": {"eps": 8 / 255, "epochs": 15, "lr": 0.2, "schedule": "cyclic", "optimizer": "sgd"},
    },
)


@register_defense(
    "fast-at-linf-v1",
    trained_against=(NormKwargThreat("linf", "fgsm-rs"),),
    kwargs=FAST_KWARGS,
    dataset_kwargs=FAST_DATASET_KWARGS,
    description="Fast adversarial training: FGSM from a random start, step 1.25 eps (Wong et al. 2020)",
)
@register_defense(
    "fgsm-at-linf-v1",
    trained_against=(NormKwargThreat("linf", "fgsm"),),
    kwargs=FGSM_KWARGS,
    dataset_kwargs=FGSM_DATASET_KWARGS,
    description="FGSM adversarial training without random start (Goodfellow et al. 2015); prone to "
    "catastrophic overfitting",
)
class FGSMAdversarialTraining(Defense):
    def __init__(self, norm: str, eps: float, rel_step: float, random_start: bool, **kwargs: Any) -> None:
        require(norm in TRAINING_NORMS, f"FGSM training: norm must be linf or l2, got {norm!r}")
        require(is_number(eps) and eps > 0, f"FGSM training: eps must be a number > 0, got {eps!r}")
        require(is_number(rel_step) and rel_step > 0, f"FGSM training: rel_step must be a number > 0, got {rel_step!r}")
        require(
            isinstance(random_start, bool), f"FGSM training: random_start must be true or false, got {random_start!r}"
        )
        self.norm = norm
        self.eps = float(eps)
        self.step = float(rel_step) * self.eps
        self.random_start = bool(random_start)
        self.train_kwargs = training_kwargs(kwargs)

    def fit(self, model: nn.Module, data: TrainData, ctx: TrainContext) -> None:
        def adversarial_loss(counted: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
            with evaluating(counted):
                x_adv = fgsm_examples(counted, x, y, self.norm, self.eps, self.step, self.random_start)
            return F.cross_entropy(counted(x_adv), y)

        train(model, data, ctx, adversarial_loss, **self.train_kwargs)
