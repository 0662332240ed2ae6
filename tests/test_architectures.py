"""Registered architectures: parameter counts against the published ones, output shapes."""

from __future__ import annotations

import pytest
import torch

from bench.foundation.architectures import ARCHITECTURES, build_architecture
from bench.foundation.errors import RobustMatrixError

CIFAR = (3, 32, 32)
MNIST = (1, 28, 28)


def parameters(name: str, shape: tuple[int, int, int]) -> int:
    return sum(p.numel() for p in build_architecture(name, shape, 10).parameters())


@pytest.mark.parametrize(
    ("name", "exact", "published"),
    [
        # Zagoruyko & Komodakis 2016, Table 1: WRN-28-10 36.5M; Madry et al./TRADES' WRN-34-10 46.2M.
        ("wrn-28-10", 36_479_194, 36.5e6),
        ("wrn-34-10", 46_160_474, 46.2e6),
        # He et al. 2016's pre-activation ResNet-18 on CIFAR-10: 11.2M.
        ("preact-resnet18", 11_172_170, 11.2e6),
    ],
)
def test_cifar_parameter_counts_match_the_papers(name: str, exact: int, published: float) -> None:
    count = parameters(name, CIFAR)
    assert count == exact
    assert round(count / 1e5) == round(published / 1e5)  # the papers' one decimal in millions


def test_mnist_nets_have_the_reference_layers() -> None:
    # TRADES SmallCNN: conv 1-32-32-64-64 (3x3), fc 1024-200-200-10.
    assert parameters("trades-smallcnn", MNIST) == (320 + 9_248 + 18_496 + 36_928) + (205_000 + 40_200 + 2_010)
    # fast_adversarial mnist_net: conv 1-16 (4x4 s2), 16-32 (4x4 s2), fc 1568-100-10.
    assert parameters("wong-mnist-net", MNIST) == 272 + 8_224 + 156_900 + 1_010
    assert set(build_architecture("wong-mnist-net", MNIST, 10).state_dict()) == {
        f"{i}.{p}" for i in (0, 2, 5, 7) for p in ("weight", "bias")
    }
    assert "feature_extractor.conv1.weight" in build_architecture("trades-smallcnn", MNIST, 10).state_dict()


@pytest.mark.parametrize("name", ["trades-smallcnn", "wong-mnist-net", "small-cnn-w32"])
def test_mnist_outputs_are_logits_per_class(name: str) -> None:
    model = build_architecture(name, MNIST, 10).eval()
    assert model(torch.rand(2, *MNIST)).shape == (2, 10)


def test_harness_architectures_are_registered_under_their_recorded_names() -> None:
    from bench.foundation.models import architecture_name

    for dataset in ("digits", "mnist", "cifar10"):
        assert architecture_name(dataset) in ARCHITECTURES


def test_unknown_architecture_is_one_line() -> None:
    with pytest.raises(RobustMatrixError, match="unknown architecture 'wrn-99'"):
        build_architecture("wrn-99", CIFAR, 10)
