"""Defenses that transform the input before the classifier sees it (quantization, compression,
smoothing, random resizing) — the family adaptive attacks (BPDA, EOT) were invented for.

The transformation lives in ``preprocess``: the runner deploys ``classifier(preprocess(x))`` and BPDA
wraps the same ``preprocess`` with an identity backward pass. The classifier is trained with
cross-entropy on transformed inputs, so clean accuracy reflects the defense as deployed. A
deterministic transformation is applied to the training split once; a randomized one (or any, with
augmentation on) is drawn afresh for every batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from defenses.base import Defense, TrainContext, TrainData
from defenses.training import train, training_kwargs, transformed


def through_numpy(transform: Callable[[np.ndarray], np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """Apply a numpy transformation (an ART preprocessor) to a batch on any device.

    The result is tied to ``x`` with a zero gradient — the honest derivative of a non-differentiable
    step as autograd sees it (like ``torch.round``) — so a plain gradient attack gets zeros rather
    than an error, and BPDA's straight-through estimator can still route gradients around it."""
    out = transform(x.detach().cpu().numpy().astype(np.float32, copy=False))
    return torch.from_numpy(np.ascontiguousarray(out)).to(device=x.device, dtype=x.dtype) + 0.0 * x


class InputTransformDefense(Defense):
    """Subclasses implement ``preprocess``; training is cross-entropy on preprocessed inputs."""

    def __init__(self, **kwargs: Any) -> None:
        self.train_kwargs = training_kwargs(kwargs)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fit(self, model: nn.Module, data: TrainData, ctx: TrainContext) -> None:
        randomized = bool(getattr(self.spec, "randomized", True))
        if randomized or self.train_kwargs["augment"]:

            def loss(counted: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
                with torch.no_grad():
                    x = self.preprocess(x)
                return F.cross_entropy(counted(x), y)

            train(model, data, ctx, loss, **self.train_kwargs)
            return
        data = replace(data, x=transformed(self.preprocess, data.x))
        train(model, data, ctx, lambda m, x, y, epoch: F.cross_entropy(m(x), y), **self.train_kwargs)
