"""Wrapping a victim for ART (adversarial-robustness-toolbox) attacks: a ``PyTorchClassifier`` on
the victim's device that casts inputs to float32 (ART's HopSkipJump feeds float64 in its binary
search) and keeps counting passes through the victim's counting model. ART's numpy round trips are
ART's; our own attacks never make them per step."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn


class Float32(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.float())


def art_classifier(model: nn.Module, x: torch.Tensor, num_classes: int) -> Any:
    from art.estimators.classification import PyTorchClassifier

    if x.device.type == "cuda":
        # ART's device_type="gpu" picks cuda:current_device(), whatever the model's device is.
        torch.cuda.set_device(x.device)
    return PyTorchClassifier(
        model=Float32(model),
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=num_classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if x.device.type == "cuda" else "cpu",
    )


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.float32)


def from_numpy(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(device=like.device, dtype=like.dtype).clamp(0, 1)


@contextmanager
def seeded_random_states() -> Iterator[None]:
    """Inside the block, ``np.random.RandomState()`` without a seed draws its seed from numpy's global
    generator (which every job seeds) instead of the operating system. ART's HopSkipJump builds an
    unseeded RandomState for fallback starting points — used when a start we pass is not adversarial
    on ART's own prediction, as happens on a randomized defense — which made its results vary
    between runs with the same seed. Jobs run one at a time per process, so the swap is safe."""
    original = np.random.RandomState

    class GloballySeeded(original):  # type: ignore[misc, valid-type]
        def __init__(self, seed: Any = None) -> None:
            super().__init__(int(np.random.randint(0, 2**31 - 1)) if seed is None else seed)

    np.random.RandomState = GloballySeeded  # type: ignore[misc]
    try:
        yield
    finally:
        np.random.RandomState = original  # type: ignore[misc]
