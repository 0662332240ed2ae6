"""Counting forward and backward passes per example: the cost unit of attacks and of training.

Counts are per example (a batch of 100 is 100 forwards), so budgets compare across batch sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PassCounter:
    forwards: int = 0
    backwards: int = 0


class CountingModel(nn.Module):
    """Wraps a model; counts examples through forward and examples whose gradient flowed back.
    Several wrappers may share one counter (a defense and its BPDA approximation)."""

    def __init__(self, model: nn.Module, counter: PassCounter | None = None) -> None:
        super().__init__()
        self.model = model
        self.counter = counter if counter is not None else PassCounter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        self.counter.forwards += n
        out = self.model(x)
        if out.requires_grad:
            out.register_hook(lambda grad: self._count_backward(n))
        return out

    def _count_backward(self, n: int) -> None:
        self.counter.backwards += n
