"""Local spatial smoothing — a median filter over each channel (Xu et al. 2018's second squeezer) —
wrapped from ART's numpy ``SpatialSmoothing`` preprocessor, not re-implemented.

ART's torch version, ``SpatialSmoothingPyTorch``, would keep the batch on the device, but it imports
``kornia`` (not a dependency of ART nor of ours) when it is built, so the numpy one is wrapped:
the batch goes to the CPU and back on every forward pass and no gradient flows through it. The
defense declares itself non-differentiable with the identity as BPDA approximation.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.foundation.registry import register_defense
from defenses.input_transform import InputTransformDefense, through_numpy
from defenses.training import is_count, require, with_training_defaults

# Xu et al.: 2x2 on MNIST, 2x2 on CIFAR-10; the 8x8 digits tolerate no more than 2x2 either.
KWARGS, DATASET_KWARGS = with_training_defaults({"window_size": 2})


@register_defense(
    "art-spatial-smoothing-v1",
    differentiable=False,
    bpda_approximation="identity",
    kwargs=KWARGS,
    dataset_kwargs=DATASET_KWARGS,
    description="Median-filter spatial smoothing (ART SpatialSmoothing); non-differentiable, needs BPDA",
)
class ARTSpatialSmoothing(InputTransformDefense):
    def __init__(self, window_size: int, **kwargs: Any) -> None:
        require(
            is_count(window_size), f"art-spatial-smoothing: window_size must be an integer >= 1, got {window_size!r}"
        )
        super().__init__(**kwargs)
        from art.defences.preprocessor import SpatialSmoothing

        self.smoothing = SpatialSmoothing(window_size=window_size, channels_first=True, clip_values=(0.0, 1.0))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return through_numpy(lambda batch: self.smoothing(batch)[0], x)
