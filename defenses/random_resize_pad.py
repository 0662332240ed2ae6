"""Random resizing and padding at inference (Xie et al. 2018): every forward pass shrinks each image
by a random factor and pastes it at a random position of a blank canvas of the original size.

The classifier's input size is fixed, so where Xie et al. enlarge and pad to a larger canvas we
shrink and pad to the same one — the same mechanism (random scale, random offset). It is one
``grid_sample`` per batch, per-example draws from torch's global RNG (the runner seeds each job), and
differentiable: what protects it is the randomness, so it declares ``randomized`` and the runner
pairs it with EOT attacks, which average gradients over the draws.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from bench.foundation.registry import register_defense
from defenses.input_transform import InputTransformDefense
from defenses.training import is_number, require, with_training_defaults


def random_resize_pad(x: torch.Tensor, min_scale: float) -> torch.Tensor:
    """Each image scaled by s ~ U[min_scale, 1] and placed at a uniformly random offset inside the
    frame (zeros elsewhere), bilinearly."""
    batch = x.shape[0]
    scale = min_scale + (1.0 - min_scale) * torch.rand(batch, device=x.device, dtype=x.dtype)
    # normalised coordinates in [-1, 1]: a shrunk image fits anywhere its centre is within 1 - s of 0
    centre = (torch.rand(batch, 2, device=x.device, dtype=x.dtype) * 2 - 1) * (1 - scale)[:, None]
    theta = torch.zeros(batch, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = 1 / scale
    theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = -centre / scale[:, None]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


KWARGS, DATASET_KWARGS = with_training_defaults(
    {"min_scale": 0.75},
    {"cifar10": {"min_scale": 0.85}},
)


@register_defense(
    "random-resize-pad-v1",
    randomized=True,
    kwargs=KWARGS,
    dataset_kwargs=DATASET_KWARGS,
    description="Random resize-and-pad at inference (Xie et al. 2018); randomized, needs EOT",
)
class RandomResizePad(InputTransformDefense):
    def __init__(self, min_scale: float, **kwargs: Any) -> None:
        require(
            is_number(min_scale) and 0 < min_scale <= 1,
            f"random-resize-pad: min_scale must be in (0, 1], got {min_scale!r}",
        )
        super().__init__(**kwargs)
        self.min_scale = float(min_scale)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return random_resize_pad(x, self.min_scale)
