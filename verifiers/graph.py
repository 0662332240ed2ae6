"""The model as a graph of operations a verifier can bound: torch.fx traces it once, standard
layers (and the harness's channels-last MaxPool2d subclass) kept as leaves, so the residual blocks
of PreAct-ResNet-18 and functional calls (F.relu, the input normalisation) appear as nodes."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from bench.foundation.counting import CountingModel
from verifiers.base import NotCertifiable

LEAVES = (
    nn.Linear,
    nn.Conv2d,
    nn.ReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.Identity,
    nn.Dropout,
)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LEAVES) or super().is_leaf_module(m, qualname)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a pass-counting wrapper."""
    while isinstance(model, CountingModel):
        model = model.model
    return model


_TRACED: dict[int, tuple[nn.Module, fx.GraphModule]] = {}


def trace(model: nn.Module) -> fx.GraphModule:
    """The traced graph of ``model`` (cached per model object: a training step traces once)."""
    model = unwrap(model)
    cached = _TRACED.get(id(model))
    if cached is not None and cached[0] is model:
        return cached[1]
    try:
        graph = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as exc:  # noqa: BLE001 - data-dependent control flow, unsupported Python
        raise NotCertifiable(
            f"{type(model).__name__} cannot be traced ({type(exc).__name__}): a randomized or data-dependent "
            "forward pass has no bound here"
        ) from None
    if len(_TRACED) > 16:
        _TRACED.clear()
    _TRACED[id(model)] = (model, graph)
    return graph


def describe(node: fx.Node, graph: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(graph.get_submodule(str(node.target))).__name__
    return getattr(node.target, "__name__", str(node.target))


def batchnorm_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode batch norm as the per-channel affine map x * scale + shift."""
    if bn.training or bn.running_mean is None:
        raise NotCertifiable(f"{type(bn).__name__} in training mode (batch statistics)")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift
