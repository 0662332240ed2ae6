"""Certified training: IBP (Gowal et al. 2018) and CROWN-IBP (Zhang et al. 2020), Linf.

The loss mixes clean cross-entropy with cross-entropy on the worst-case margins the verifier bounds:
kappa · CE(z, y) + (1 - kappa) · CE(-m, y), where m_j is the lower bound of z_y - z_j over the ball
(m_y = 0). After ``warmup`` (a fraction of the epochs) of clean training, eps ramps linearly to its
value over ``ramp`` and kappa from 1 to ``kappa_end`` with it; CROWN-IBP mixes its bound in with
weight ``crown_weight`` at the ramp's start, decaying to 0 at its end (pure IBP afterwards), as Zhang
et al. do. It minimises the same bound ``ibp-v1`` / ``crown-ibp-v1`` verify, so its certified
accuracy is the row where the bracket [certified, worst case] is tight.

Opt-in: ``*`` does not select it, so the default matrix is unchanged (``docs/certified.md``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bench.foundation.registry import register_defense
from bench.foundation.specs import TrainingThreat
from defenses.base import Defense, TrainContext, TrainData
from defenses.training import is_number, require, train, training_kwargs, with_training_defaults
from verifiers.crown import crown_margins
from verifiers.graph import unwrap
from verifiers.ibp import margin_bounds

KWARGS, DATASET_KWARGS = with_training_defaults(
    {"eps": 0.2, "warmup": 0.1, "ramp": 0.5, "kappa_end": 0.5, "crown_weight": 0.0, "epochs": 30},
    {
        "mnist": {"eps": 0.3, "warmup": 0.02, "ramp": 0.5},
        "mnist-t10k": {"eps": 0.3, "warmup": 0.02, "ramp": 0.5},
        "fashion-mnist": {"eps": 0.1, "warmup": 0.02, "ramp": 0.5},
        "cifar10": {"eps": 8 / 255, "warmup": 0.02, "ramp": 0.5},
    },
)


def schedule(epoch: int, epochs: int, warmup: float, ramp: float) -> float:
    """Fraction of the final eps at ``epoch``: 0 during warm-up, then linear to 1 over the ramp."""
    start, length = warmup * epochs, max(ramp * epochs, 1e-12)
    return float(min(1.0, max(0.0, (epoch + 1 - start) / length)))


@register_defense(
    "ibp-linf-v1",
    trained_against=(TrainingThreat("linf", "ibp"),),
    kwargs=KWARGS,
    dataset_kwargs=DATASET_KWARGS,
    opt_in=True,
    description="IBP / CROWN-IBP certified training, Linf (Gowal et al. 2018; Zhang et al. 2020)",
)
class IBPTraining(Defense):
    def __init__(
        self, eps: float, warmup: float, ramp: float, kappa_end: float, crown_weight: float, **kwargs: Any
    ) -> None:
        require(is_number(eps) and eps > 0, f"ibp training: eps must be a number > 0, got {eps!r}")
        for name, value in (
            ("warmup", warmup),
            ("ramp", ramp),
            ("kappa_end", kappa_end),
            ("crown_weight", crown_weight),
        ):
            require(is_number(value) and 0 <= value <= 1, f"ibp training: {name} must be in [0, 1], got {value!r}")
        self.eps, self.warmup, self.ramp = float(eps), float(warmup), float(ramp)
        self.kappa_end, self.crown_weight = float(kappa_end), float(crown_weight)
        self.train_kwargs = training_kwargs(kwargs)

    def fit(self, model: nn.Module, data: TrainData, ctx: TrainContext) -> None:
        epochs = self.train_kwargs["epochs"]

        def certified_loss(counted: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
            clean = F.cross_entropy(counted(x), y)
            progress = schedule(epoch, epochs, self.warmup, self.ramp)
            if progress == 0.0:
                return clean
            eps = self.eps * progress
            kappa = 1.0 - (1.0 - self.kappa_end) * progress
            net = unwrap(counted)
            margins = margin_bounds(net, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1), y)
            beta = self.crown_weight * (1.0 - progress) if progress < 1.0 else 0.0
            if beta > 0:
                margins = beta * crown_margins(net, x, y, "linf", eps, "ibp") + (1 - beta) * margins
            ctx.counter.forwards += 2 * len(y)  # the bound's passes: centre and radius
            return kappa * clean + (1 - kappa) * F.cross_entropy(-margins, y)

        train(model, data, ctx, certified_loss, **self.train_kwargs)
