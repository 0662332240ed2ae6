"""Bit-depth reduction (feature squeezing, Xu et al. 2018): every pixel is rounded to one of
2^bits levels before the classifier sees it.

Rounding is piecewise constant: its gradient is zero almost everywhere, so plain gradient attacks
stall and report robustness the model does not have (Athalye et al. 2018's "shattered gradients").
The defense declares itself non-differentiable with the identity as its BPDA approximation, and the
runner pairs it with BPDA attacks. Native torch, on the device; equal to ART's ``FeatureSqueezing``
(checked in tests/test_defenses_art.py).
"""

from __future__ import annotations

from typing import Any

import torch

from bench.foundation.registry import register_defense
from defenses.input_transform import InputTransformDefense
from defenses.training import is_count, require, with_training_defaults


def quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round images in [0, 1] to 2^bits evenly spaced levels (round half to even, like numpy's rint)."""
    levels = 2**bits - 1
    return torch.round(x.clamp(0.0, 1.0) * levels) / levels


# Xu et al. squeeze MNIST to 1 bit and CIFAR-10 to 5 bits. The digits have 17 grey levels; 2 bits
# (4 levels) keeps them legible at 8x8.
KWARGS, DATASET_KWARGS = with_training_defaults(
    {"bits": 2},
    {"mnist": {"bits": 1}, "mnist-t10k": {"bits": 1}, "fashion-mnist": {"bits": 3}, "cifar10": {"bits": 5}},
)


@register_defense(
    "bit-depth-v1",
    differentiable=False,
    bpda_approximation="identity",
    kwargs=KWARGS,
    dataset_kwargs=DATASET_KWARGS,
    description="Bit-depth reduction / feature squeezing (Xu et al. 2018); zero gradients, needs BPDA",
)
class BitDepthReduction(InputTransformDefense):
    def __init__(self, bits: int, **kwargs: Any) -> None:
        require(is_count(bits) and bits <= 16, f"bit-depth: bits must be an integer from 1 to 16, got {bits!r}")
        super().__init__(**kwargs)
        self.bits = bits

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return quantize(x, self.bits)
