"""JPEG compression of the input (Dziugaite et al. 2016; Guo et al. 2018), wrapped from ART's
``JpegCompression`` preprocessor — not re-implemented.

ART's preprocessor is numpy + PIL, one image at a time: the batch makes a round trip to the CPU on
every forward pass and no gradient flows through it. The defense declares itself non-differentiable
with the identity as BPDA approximation (JPEG is close to the identity on natural images, which is
exactly why BPDA breaks it). ART is imported when the defense is built, not when it is registered.

Per image, PIL's fixed cost dwarfs compressing an 8x8 digit (≈ 0.2 ms each: 12x the classifier's
forward pass). Grayscale JPEG codes every 8x8 block on its own, so the batch goes to ART as one
mosaic of tiles padded to whole blocks the way libjpeg pads an image's edge (by repeating it), and
comes back cut apart: the same pixels as image by image (``tests/test_defenses_art.py`` checks it
against ART's per-image output), in one call. Colour images, whose chroma is subsampled and
smoothed across blocks, go image by image.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from bench.foundation.registry import register_defense
from defenses.input_transform import InputTransformDefense, through_numpy
from defenses.training import is_count, require, with_training_defaults

JPEG_BLOCK = 8
"""The side of the blocks JPEG transforms and quantizes independently (luma, baseline)."""

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
        return through_numpy(lambda batch: self.compress(batch.clip(0.0, 1.0)), x)

    def compress(self, batch: np.ndarray) -> np.ndarray:
        """ART's JPEG of an NCHW batch in [0, 1]: one mosaic for grayscale, image by image otherwise."""
        n, channels, height, width = batch.shape
        if channels != 1 or n <= 1:
            return self.jpeg(batch)[0]
        block_h, block_w = height + (-height % JPEG_BLOCK), width + (-width % JPEG_BLOCK)
        tiles = np.pad(batch[:, 0], ((0, 0), (0, block_h - height), (0, block_w - width)), mode="edge")
        columns = math.ceil(math.sqrt(n))
        rows = math.ceil(n / columns)
        tiles = np.concatenate([tiles, np.zeros((rows * columns - n, block_h, block_w), batch.dtype)])
        mosaic = tiles.reshape(rows, columns, block_h, block_w).transpose(0, 2, 1, 3).reshape(rows * block_h, -1)
        out = self.jpeg(mosaic[None, None])[0][0, 0]
        tiles = out.reshape(rows, block_h, columns, block_w).transpose(0, 2, 1, 3).reshape(-1, block_h, block_w)
        return np.ascontiguousarray(tiles[:n, None, :height, :width])
