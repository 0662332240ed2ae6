"""TRADES (Zhang et al. 2019): cross-entropy on clean inputs plus β times the KL divergence between
the model's predictions on the clean input and on a nearby adversarial input.

The inner maximization attacks the *KL term*, not the cross-entropy: starting a hair away from the
clean input (0.001·N(0, I)), it ascends KL(p(x) ‖ p(x')) with projected steps. That is what makes
TRADES a different defense from PGD-AT, and what ART's ``AdversarialTrainerTRADESPyTorch`` does not
do — it runs whatever attack it is given (cross-entropy PGD in practice); its outer loss is the same
as ours. tests/test_defenses_art.py checks ours against it at the same budget (with a CE-PGD inner
attack), on a model that is not an ``nn.Sequential`` and without a learning-rate scheduler: ART's
train-accuracy bookkeeping reads ``model_outputs_pert[0]`` (for an ``nn.Sequential``, the first
layer's output instead of the logits, which crashes), and a scheduler, if passed, must be a
pre-torch-2 ``_LRScheduler``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from attacks.base import clip_to_threat, input_gradient, steepest_ascent
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

START_SCALE = 0.001
"""TRADES starts its inner maximization at x + 0.001·N(0, I): at x itself the KL gradient is zero."""


def kl_from_clean(logits: torch.Tensor, clean_probs: torch.Tensor) -> torch.Tensor:
    """Per-example KL(p_clean ‖ softmax(logits)): an attack loss whose "labels" are the clean probabilities."""
    return F.kl_div(F.log_softmax(logits, dim=1), clean_probs, reduction="none").sum(dim=1)


def kl_examples(model: nn.Module, x: torch.Tensor, norm: str, eps: float, steps: int, step_size: float) -> torch.Tensor:
    """TRADES' inner maximization: points of the eps-ball maximizing the KL divergence from the
    model's clean prediction (labels are not used)."""
    with torch.no_grad():
        clean_probs = F.softmax(model(x), dim=1)
    x_adv = clip_to_threat(x, x + START_SCALE * torch.randn_like(x), norm, eps)
    for _ in range(steps):
        grad, _, _ = input_gradient(model, x_adv, clean_probs, kl_from_clean)
        x_adv = clip_to_threat(x, x_adv + step_size * steepest_ascent(grad, norm), norm, eps)
    return x_adv


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """CE(f(x), y) + β · KL(p(x) ‖ p(x')), averaged over the batch."""
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
    return F.cross_entropy(logits_clean, y) + beta * kl


# Zhang et al.: MNIST eps 0.3, 40 steps of 0.01, β = 1; CIFAR-10 eps 0.031, 10 steps of 0.007, β = 6.
_MNIST = {"eps": 0.3, "steps": 40, "rel_step": 0.01 / 0.3, "beta": 1.0}
KWARGS, DATASET_KWARGS = with_training_defaults(
    {"norm": "linf", "eps": 0.2, "steps": 5, "rel_step": 0.5, "beta": 6.0},
    {
        "mnist": _MNIST,
        "mnist-t10k": _MNIST,
        "fashion-mnist": {**_MNIST, "eps": 0.1, "rel_step": 0.1},
        "cifar10": {"eps": 0.031, "steps": 10, "rel_step": 0.007 / 0.031, "beta": 6.0},
    },
)


@register_defense(
    "trades-linf-v1",
    trained_against=(NormKwargThreat("linf", "pgd-kl"),),
    kwargs=KWARGS,
    dataset_kwargs=DATASET_KWARGS,
    description="TRADES: clean cross-entropy + beta * KL to a KL-maximizing neighbour (Zhang et al. 2019)",
)
class TRADES(Defense):
    def __init__(self, norm: str, eps: float, steps: int, rel_step: float, beta: float, **kwargs: Any) -> None:
        require(is_number(beta) and beta >= 0, f"TRADES: beta must be >= 0, got {beta!r}")
        check_pgd_kwargs("TRADES", norm, eps, steps, rel_step)
        self.norm = norm
        self.eps = float(eps)
        self.steps = int(steps)
        self.step_size = float(rel_step) * self.eps
        self.beta = float(beta)
        self.train_kwargs = training_kwargs(kwargs)

    def fit(self, model: nn.Module, data: TrainData, ctx: TrainContext) -> None:
        def loss(counted: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
            with evaluating(counted):
                x_adv = kl_examples(counted, x, self.norm, self.eps, self.steps, self.step_size)
            # two passes, not one concatenated batch: batch-norm statistics stay those of each input kind
            return trades_loss(counted(x), counted(x_adv), y, self.beta)

        train(model, data, ctx, loss, **self.train_kwargs)
