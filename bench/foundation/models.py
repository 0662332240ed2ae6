"""Classifier architectures: a small CNN sized to the image, PreAct-ResNet-18 for CIFAR-10.

Models take images in [0, 1] and return logits; any input normalisation lives inside the model so
that attacks always work in pixel space.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

WINDOW = [2, 2]


class _Pool2x2(torch.autograd.Function):
    """2x2 stride-2 max pooling for passes that build a graph: PyTorch's channels-last kernel finds
    the maxima and their indices (5 ms against the channels-first kernel's 12 ms, a batch of 200
    digits feature maps, one CPU thread), and its channels-first backward (1 ms) scatters the
    gradient with those indices, so the gradient goes to the same element, ties included. The
    backward is itself differentiable: double backward (gradient penalties) works."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        pooled, indices = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2, return_indices=True)
        ctx.save_for_backward(x, indices.contiguous())
        return pooled.contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        x, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, WINDOW, WINDOW, [0, 0], [1, 1], False, indices
        )


def _max_of_corners(x: torch.Tensor) -> torch.Tensor:
    """Forward-only 2x2 stride-2 max pooling as the maximum of four strided views: 2 ms for the
    batch above (the same values bit for bit; there is no gradient to route)."""
    height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    top = torch.maximum(x[..., 0:height:2, 0:width:2], x[..., 0:height:2, 1:width:2])
    return torch.maximum(top, torch.maximum(x[..., 1:height:2, 0:width:2], x[..., 1:height:2, 1:width:2]))


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools the usual 2x2 stride-2 window of a CPU batch faster: PyTorch's
    channels-first CPU max pool costs more than the convolutions around it, and every attack step
    and training step goes through it. The same values and gradients bit for bit
    (tests/test_models.py); anything else (other windows, other devices) is PyTorch's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = (
            self.kernel_size in (2, (2, 2))
            and self.stride in (2, (2, 2))
            and self.padding in (0, (0, 0))
            and self.dilation in (1, (1, 1))
            and not self.ceil_mode
            and not self.return_indices
        )
        if not plain or x.device.type != "cpu" or x.dim() != 4:
            return super().forward(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _Pool2x2.apply(x)
        return _max_of_corners(x)


class SmallCNN(nn.Module):
    """Conv-conv-pool (plus one more conv-pool for images larger than 16 px) and a two-layer head:
    cheap enough to adversarially train on 8x8 digits on a CPU in seconds."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            MaxPool2d(2),
        ]
        side = image_size // 2
        if image_size > 16:
            layers += [nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), MaxPool2d(2)]
            side //= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False) if stride != 1 or in_planes != planes else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """He et al. 2016's pre-activation ResNet-18, the usual CIFAR-10 robustness architecture."""

    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2471, 0.2435, 0.2616)

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(self.MEAN[:in_channels]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(self.STD[:in_channels]).view(1, -1, 1, 1))
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        layers, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_PreActBlock(in_planes, planes, stride), _PreActBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1((x - self.mean) / self.std))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1)
        return self.linear(out.flatten(1))


SMALL_IMAGE_WIDTH = 16
"""Channels of the small CNN's first layer for images of at most 8x8 pixels (digits). Width 32
costs 3x the compute there for about 6 points of PGD-AT robust accuracy (0.59 vs 0.53 at Linf 0.2,
20 epochs); the default matrix attacks every defense with ~40 attacks, so the CPU budget decides."""


def small_cnn_width(image_size: int) -> int:
    return SMALL_IMAGE_WIDTH if image_size <= 8 else 32


def build_model(dataset: str, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The benchmark's architecture for a dataset: PreAct-ResNet-18 on CIFAR-10, else a small CNN."""
    channels, height, _ = image_shape
    if dataset == "cifar10":
        return PreActResNet18(num_classes, channels)
    return SmallCNN(channels, height, num_classes, width=small_cnn_width(height))


def architecture_name(dataset: str) -> str:
    if dataset == "cifar10":
        return "preact-resnet18"
    return f"small-cnn-w{SMALL_IMAGE_WIDTH}" if dataset == "digits" else "small-cnn-w32"
