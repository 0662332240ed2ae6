"""The architectures' own guarantees: the small CNN's fast pooling is PyTorch's max pool, bit for bit,
in values, gradients (ties included) and second derivatives."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.foundation.models import MaxPool2d, SmallCNN


def _features(shape: tuple[int, ...]) -> torch.Tensor:
    torch.manual_seed(0)
    features = torch.randn(*shape).relu()  # ReLU outputs: many ties at zero
    features[..., :2, :2] = 0.5  # and ties at a positive value, where the gradient must pick one
    features[..., 2:4, 2:4] = torch.tensor([[0.1, 0.7], [0.7, 0.7]])
    return features


@pytest.mark.parametrize("shape", [(64, 32, 8, 8), (8, 16, 7, 7), (16, 6, 6, 6)])
def test_pooling_equals_torchs_max_pool_in_values_and_gradients_bit_for_bit(shape):
    features = _features(shape)
    ours_in, theirs_in = features.clone().requires_grad_(True), features.clone().requires_grad_(True)
    ours, theirs = MaxPool2d(2)(ours_in), nn.MaxPool2d(2)(theirs_in)
    assert torch.equal(ours, theirs) and ours.is_contiguous()
    upstream = torch.randn_like(ours)
    (ours_grad,) = torch.autograd.grad(ours, ours_in, upstream)
    (theirs_grad,) = torch.autograd.grad(theirs, theirs_in, upstream)
    assert torch.equal(ours_grad, theirs_grad)  # ties: the whole gradient to the first maximum
    with torch.no_grad():
        assert torch.equal(MaxPool2d(2)(features), theirs)
    with torch.inference_mode():
        assert torch.equal(MaxPool2d(2)(features), theirs)


def test_the_small_cnn_gives_torchs_logits_gradients_and_gradient_penalty_gradients():
    torch.manual_seed(0)
    model = SmallCNN(1, 8, 10)
    reference = SmallCNN(1, 8, 10)
    reference.load_state_dict(model.state_dict())
    for i, layer in enumerate(reference.features):
        if isinstance(layer, MaxPool2d):
            reference.features[i] = nn.MaxPool2d(2)
    x = (torch.rand(50, 1, 8, 8) * 4).round() / 4  # quantized inputs: equal activations tie
    y = torch.randint(0, 10, (50,))

    def penalty_gradients(net: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        inputs = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(net(inputs), y)
        (input_grad,) = torch.autograd.grad(loss, inputs, create_graph=True)
        weights = torch.autograd.grad(loss + input_grad.square().sum(), list(net.parameters()))
        return input_grad.detach(), list(weights)

    ours, theirs = penalty_gradients(model), penalty_gradients(reference)
    assert torch.equal(ours[0], theirs[0])
    for mine, torchs in zip(ours[1], theirs[1], strict=True):
        assert torch.allclose(mine, torchs, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
