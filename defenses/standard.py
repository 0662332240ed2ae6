"""No defense: cross-entropy training on clean data. The reference every defense is compared with,
and the surrogate that transfer attacks craft their examples on."""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from bench.foundation.registry import register_defense
from defenses.base import Defense, TrainContext, TrainData
from defenses.training import train, training_kwargs, with_training_defaults

KWARGS, DATASET_KWARGS = with_training_defaults({})


@register_defense(
    "standard-v1",
    kwargs=KWARGS,
    dataset_kwargs=DATASET_KWARGS,
    description="No defense: cross-entropy training on clean data",
)
class Standard(Defense):
    def __init__(self, **kwargs: object) -> None:
        self.train_kwargs = training_kwargs(kwargs)

    def fit(self, model: nn.Module, data: TrainData, ctx: TrainContext) -> None:
        train(model, data, ctx, lambda m, x, y, epoch: F.cross_entropy(m(x), y), **self.train_kwargs)
