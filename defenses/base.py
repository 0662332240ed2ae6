"""What every defense shares: how it is trained, how it is deployed, and what it tells attacks.

A defense is one class: ``fit`` trains the benchmark's architecture in place (or the defense may
wrap it first in ``build_model``), ``preprocess`` is its inference-time input transformation, and
``deploy`` returns the module that is attacked and scored (images in [0, 1] -> logits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bench.foundation.counting import PassCounter


@dataclass(frozen=True)
class TrainData:
    """Training split on the training device."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    dataset: str


@dataclass
class TrainContext:
    """What the runner lends a defense while it trains: device, seed, a pass counter (training
    cost is reported next to robustness) and a per-epoch progress callback."""

    device: torch.device
    seed: int
    counter: PassCounter = field(default_factory=PassCounter)
    on_epoch: Callable[[int, int, float], None] = lambda epoch, epochs, loss: None

    def generator(self) -> torch.Generator:
        """A generator for data order, seeded so training is reproducible."""
        return torch.Generator().manual_seed(self.seed)


class DeployedModel(nn.Module):
    """classifier(preprocess(x)): the defended model as attacks see it."""

    def __init__(self, classifier: nn.Module, preprocess: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.classifier = classifier
        self.preprocess = preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.preprocess(x))


class StraightThrough(nn.Module):
    """BPDA with the identity: the forward pass is the real defense, the backward pass treats the
    preprocessing as the identity (Athalye et al. 2018)."""

    def __init__(self, classifier: nn.Module, preprocess: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.classifier = classifier
        self.preprocess = preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x + (self.preprocess(x) - x).detach())


class Defense:
    """Base class; ``spec`` and ``kwargs`` are set by ``DefenseSpec.make``."""

    spec: Any = None
    kwargs: dict[str, Any]

    def build_model(self, model: nn.Module) -> nn.Module:
        """Wrap or replace the benchmark architecture (default: use it as is)."""
        return model

    def fit(self, model: nn.Module, data: TrainData, ctx: TrainContext) -> None:
        raise NotImplementedError

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Inference-time input transformation (default: none)."""
        return x

    def deploy(self, model: nn.Module) -> nn.Module:
        return DeployedModel(model.eval(), self.preprocess).eval()

    def gradient_approximation(self, model: nn.Module) -> nn.Module | None:
        """The differentiable stand-in BPDA attacks differentiate through; None if not needed."""
        approximation = getattr(self.spec, "bpda_approximation", None)
        if approximation is None:
            return None
        if approximation == "identity":
            return StraightThrough(model.eval(), self.preprocess).eval()
        raise ValueError(f"unknown bpda_approximation {approximation!r}")
