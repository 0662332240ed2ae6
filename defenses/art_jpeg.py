"""JPEG compression of the input (Dziugaite et al. 2016; Guo et al. 2018), wrapped from ART's
``JpegCompression`` preprocessor — not re-implemented.

ART's preprocessor is numpy + PIL, one image at a time: the batch makes a round trip to the CPU on
every forward pass and no gradient flows through it. The defense declares itself non-differentiable
with the identity as BPDA approximation (JPEG is close to the identity on natural images, which is
exactly why BPDA breaks it). ART is imported when the defense is built, not when it is registered.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.registry import register_defense
from defenses.input_transform import InputTransformDefense, through_numpy
from defenses.training import is_count, require, with_training_defaults

KWARGS, DATASET_KWARGS = with_training_defaults({"quality": 50}, {"cifar10": {"quality": 75}})


@register_defense(
    "art-jpeg-v1",
    differentiable=False,
    bpda_approximation="identity",
    kwargs=KWARGS,
    dataset_kwargs=DATASET_KWARGS,
    description="JPEG compression of the input (ART JpegCompression); non-differentiable, needs BPDA",
)
class ARTJpegCompression(InputTransformDefense):
    def __init__(self, quality: int, **kwargs: Any) -> None:
        require(
            is_count(quality) and quality <= 95, f"art-jpeg: quality must be an integer from 1 to 95, got {quality!r}"
        )
        super().__init__(**kwargs)
        from art.defences.preprocessor import JpegCompression

        self.jpeg = JpegCompression(clip_values=(0.0, 1.0), quality=quality, channels_first=True)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return through_numpy(lambda batch: self.jpeg(batch.clip(0.0, 1.0))[0], x)
