"""Randomized smoothing (Cohen et al. 2019), L2: the classifier is trained on Gaussian-noised inputs
(noise level ``sigma``) and deployed as the smoothed classifier g — a Monte-Carlo majority vote of
``samples`` noisy draws per prediction, so it is randomized (declared: EOT attacks pair with it). The
``smoothing-v1`` verifier certifies g with its own draws (CERTIFY, Clopper-Pearson).

Opt-in: ``*`` does not select it, so the default matrix is unchanged (``docs/certified.md``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bench.foundation.registry import register_defense
from defenses.base import Defense, TrainContext, TrainData
from defenses.training import is_count, is_number, require, train, training_kwargs, with_training_defaults
from verifiers.smoothing import SmoothedClassifier

KWARGS, DATASET_KWARGS = with_training_defaults(
    {"sigma": 0.5, "samples": 16},
    {"cifar10": {"sigma": 0.25}},
)


@register_defense(
    "smoothing-l2-v1",
    randomized=True,
    kwargs=KWARGS,
    dataset_kwargs=DATASET_KWARGS,
    opt_in=True,
    description="Gaussian-noise training deployed as a randomized-smoothing majority vote (Cohen et al. 2019)",
)
class GaussianSmoothing(Defense):
    def __init__(self, sigma: float, samples: int, **kwargs: Any) -> None:
        require(is_number(sigma) and sigma > 0, f"smoothing: sigma must be a number > 0, got {sigma!r}")
        require(is_count(samples), f"smoothing: samples must be an integer >= 1, got {samples!r}")
        self.sigma, self.samples = float(sigma), int(samples)
        self.train_kwargs = training_kwargs(kwargs)

    def fit(self, model: nn.Module, data: TrainData, ctx: TrainContext) -> None:
        def noisy_loss(counted: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
            return F.cross_entropy(counted(x + self.sigma * torch.randn_like(x)), y)

        train(model, data, ctx, noisy_loss, **self.train_kwargs)

    def deploy(self, model: nn.Module) -> nn.Module:
        return SmoothedClassifier(model.eval(), self.sigma, self.samples).eval()
