"""Architectures by name, for pretrained defenses: the harness's own models and the ones published
robust models use, written from the papers' (and their reference code's) descriptions with the
reference code's parameter names, so that a published ``state_dict`` loads as it is.

Each entry is a factory ``(image_shape, num_classes) -> nn.Module``; models take images in [0, 1]
and return logits (a model's own normalisation is declared with the pretrained defense).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import nn
from torch.nn import functional as F

from bench.foundation.errors import RobustMatrixError
from bench.foundation.models import PreActResNet18, SmallCNN

Factory = Callable[[tuple[int, int, int], int], nn.Module]


class TradesSmallCNN(nn.Module):
    """The MNIST ``SmallCNN`` of TRADES (Zhang et al. 2019) and AutoAttack's model zoo:
    conv32-conv32-pool-conv64-conv64-pool-fc200-fc200-fc10, 3x3 convolutions without padding."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, drop: float = 0.5) -> None:
        super().__init__()
        self.feature_extractor = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(in_channels, 32, 3)),
                    ("relu1", nn.ReLU()),
                    ("conv2", nn.Conv2d(32, 32, 3)),
                    ("relu2", nn.ReLU()),
                    ("maxpool1", nn.MaxPool2d(2, 2)),
                    ("conv3", nn.Conv2d(32, 64, 3)),
                    ("relu3", nn.ReLU()),
                    ("conv4", nn.Conv2d(64, 64, 3)),
                    ("relu4", nn.ReLU()),
                    ("maxpool2", nn.MaxPool2d(2, 2)),
                ]
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc1", nn.Linear(64 * 4 * 4, 200)),
                    ("relu1", nn.ReLU()),
                    ("drop", nn.Dropout(drop)),
                    ("fc2", nn.Linear(200, 200)),
                    ("relu2", nn.ReLU()),
                    ("fc3", nn.Linear(200, num_classes)),
                ]
            )
        )

    def forward(self, x):  # noqa: ANN001, ANN201 - nn.Module's signature
        return self.classifier(self.feature_extractor(x).flatten(1))


def wong_mnist_net(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """``mnist_net`` of Wong, Rice & Kolter 2020 (``fast_adversarial``): conv16 (4x4, stride 2) -
    conv32 (4x4, stride 2) - fc100 - fc10, an ``nn.Sequential`` indexed as theirs (0, 2, 5, 7)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


class _WideBasic(nn.Module):
    """Pre-activation wide block (BN-ReLU-conv3x3-BN-ReLU-conv3x3), TRADES/RobustBench naming."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal = in_planes == out_planes
        self.convShortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x):  # noqa: ANN001, ANN201
        out = self.relu1(self.bn1(x))
        shortcut = x if self.equal else self.convShortcut(out)
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return out + shortcut


class _NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[_WideBasic(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.layer(x)


class WideResNet(nn.Module):
    """WideResNet-depth-widen (Zagoruyko & Komodakis 2016) for 32x32 images: (depth - 4) / 6 blocks
    per group at 16k, 32k, 64k channels. No normalisation inside (declare mean/std)."""

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise RobustMatrixError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = _NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = _NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)

    def forward(self, x):  # noqa: ANN001, ANN201
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.adaptive_avg_pool2d(self.relu(self.bn1(out)), 1)
        return self.fc(out.flatten(1))


ARCHITECTURES: dict[str, Factory] = {
    "small-cnn-w16": lambda shape, k: SmallCNN(shape[0], shape[1], k, width=16),
    "small-cnn-w32": lambda shape, k: SmallCNN(shape[0], shape[1], k, width=32),
    "preact-resnet18": lambda shape, k: PreActResNet18(k, shape[0]),
    "trades-smallcnn": lambda shape, k: TradesSmallCNN(shape[0], k),
    "wong-mnist-net": lambda shape, k: wong_mnist_net(shape[0], k),
    "wrn-28-10": lambda shape, k: WideResNet(28, 10, k, shape[0]),
    "wrn-34-10": lambda shape, k: WideResNet(34, 10, k, shape[0]),
}
"""The harness's own models under the names its trainings record (``architecture_name``), then the
published ones."""


def build_architecture(name: str, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A registered architecture for images of ``image_shape`` (C, H, W) and ``num_classes``."""
    if name not in ARCHITECTURES:
        raise RobustMatrixError(f"unknown architecture '{name}' (registered: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[name](image_shape, num_classes)
