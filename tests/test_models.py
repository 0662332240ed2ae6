"""The architectures' own guarantees: the small CNN's forward-only pooling is PyTorch's, bit for bit."""

from __future__ import annotations

import torch
from torch import nn

from bench.foundation.models import MaxPool2d, SmallCNN


def test_forward_only_pooling_equals_torchs_max_pool_bit_for_bit():
    torch.manual_seed(0)
    features = torch.randn(64, 32, 8, 8).relu()  # ReLU outputs: many ties at zero
    ours, theirs = MaxPool2d(2), nn.MaxPool2d(2)
    with torch.no_grad():
        pooled = ours(features)
        assert torch.equal(pooled, theirs(features)) and pooled.is_contiguous()
    with torch.inference_mode():
        assert torch.equal(ours(features), theirs(features))


def test_the_small_cnn_gives_the_same_logits_and_gradients_with_and_without_a_graph():
    torch.manual_seed(0)
    model = SmallCNN(1, 8, 10).eval()
    x = torch.rand(50, 1, 8, 8, requires_grad=True)
    logits = model(x)
    with torch.no_grad():
        assert torch.equal(model(x), logits)
    reference = SmallCNN(1, 8, 10).eval()
    reference.load_state_dict(model.state_dict())
    for i, layer in enumerate(reference.features):
        if isinstance(layer, MaxPool2d):
            reference.features[i] = nn.MaxPool2d(2)
    (ours,) = torch.autograd.grad(logits.sum(), x)
    (theirs,) = torch.autograd.grad(reference(x).sum(), x)
    assert torch.equal(ours, theirs)
