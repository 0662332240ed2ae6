"""Interval bound propagation (IBP; Gowal et al. 2018): elementwise lower and upper bounds pushed
through every node of the traced model — affine layers as centre ± |W|·radius, monotone ones
(ReLU, pooling, reshapes) on each end — and, through the last linear layer, the margins
z_y - z_j bounded directly with the specification matrix (tighter than subtracting logit bounds).

Sound for the harness's architectures: Linear, Conv2d, ReLU, max and average pooling, Flatten,
eval-mode BatchNorm, the input normalisation and the residual additions of PreAct-ResNet-18.
Anything else is ``NotCertifiable`` with the node named. The functions are differentiable, so
certified training (defenses/ibp_training.py) minimises the same bound it is verified with.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from bench.foundation.registry import register_verifier
from verifiers.base import NotCertifiable, Verifier, certified_from_margins, input_box, margin_spec
from verifiers.graph import batchnorm_affine, describe, trace


@dataclass(frozen=True)
class Interval:
    lower: torch.Tensor
    upper: torch.Tensor

    @property
    def mid(self) -> torch.Tensor:
        return (self.upper + self.lower) / 2

    @property
    def rad(self) -> torch.Tensor:
        return (self.upper - self.lower) / 2

    @classmethod
    def around(cls, mid: torch.Tensor, rad: torch.Tensor) -> Interval:
        return cls(mid - rad, mid + rad)

    def map(self, fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> Interval:
        """A monotone non-decreasing map applied to both ends."""
        return Interval(fn(self.lower, *args, **kwargs), fn(self.upper, *args, **kwargs))


def affine(layer: nn.Module, box: Interval) -> Interval:
    """Linear or Conv2d: the image of a box is enclosed by centre W·mid + b, radius |W|·rad."""
    if isinstance(layer, nn.Linear):
        return Interval.around(layer(box.mid), F.linear(box.rad, layer.weight.abs()))
    if layer.padding_mode != "zeros":
        raise NotCertifiable(f"Conv2d with padding_mode {layer.padding_mode}")
    rad = F.conv2d(box.rad, layer.weight.abs(), None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return Interval.around(layer(box.mid), rad)


def scaled(box: Interval, scale: torch.Tensor | float, shift: torch.Tensor | float = 0.0) -> Interval:
    """x * scale + shift for a constant scale of either sign."""
    scale = torch.as_tensor(scale, dtype=box.lower.dtype, device=box.lower.device)
    return Interval.around(box.mid * scale + shift, box.rad * scale.abs())


def _channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, *([1] * (like.dim() - 2)))


def _module(layer: nn.Module, box: Interval) -> Interval:
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        return affine(layer, box)
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale, shift = batchnorm_affine(layer)
        return scaled(box, _channel(scale, box.lower), _channel(shift, box.lower))
    if isinstance(layer, (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)):
        return box.map(layer)
    if isinstance(layer, nn.Dropout) and not layer.training:
        return box
    raise NotCertifiable(type(layer).__name__)


MONOTONE_FUNCTIONS = {F.relu, torch.relu, torch.flatten, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d}
MONOTONE_METHODS = {"relu", "flatten", "view", "reshape", "contiguous"}


def _arithmetic(op: Any, a: Any, b: Any) -> Interval:
    if op is operator.add:
        if isinstance(a, Interval) and isinstance(b, Interval):
            return Interval(a.lower + b.lower, a.upper + b.upper)
        box, c = (a, b) if isinstance(a, Interval) else (b, a)
        return Interval(box.lower + c, box.upper + c)
    if op is operator.sub:
        if isinstance(a, Interval) and isinstance(b, Interval):
            return Interval(a.lower - b.upper, a.upper - b.lower)
        if isinstance(a, Interval):
            return Interval(a.lower - b, a.upper - b)
        return Interval(a - b.upper, a - b.lower)
    if op is operator.mul and not (isinstance(a, Interval) and isinstance(b, Interval)):
        box, c = (a, b) if isinstance(a, Interval) else (b, a)
        return scaled(box, c)
    if op is operator.truediv and isinstance(a, Interval) and not isinstance(b, Interval):
        return scaled(a, 1.0 / b)
    raise NotCertifiable(f"{op.__name__} of two bounded values")


def _attribute(graph: fx.GraphModule, target: str) -> Any:
    value: Any = graph
    for part in target.split("."):
        value = getattr(value, part)
    return value


def propagate(model: nn.Module, box: Interval) -> tuple[fx.GraphModule, dict[fx.Node, Any]]:
    """Every node's value over the box: an Interval where it depends on the input, else a constant."""
    graph = trace(model)
    env: dict[fx.Node, Any] = {}

    def value(arg: Any) -> Any:
        return env[arg] if isinstance(arg, fx.Node) else arg

    for node in graph.graph.nodes:
        args = [value(a) for a in node.args]
        kwargs = {k: value(v) for k, v in node.kwargs.items()}
        if node.op == "placeholder":
            env[node] = box
        elif node.op == "get_attr":
            env[node] = _attribute(graph, str(node.target))
        elif node.op == "output":
            env[node] = args[0]
        elif not any(isinstance(a, Interval) for a in [*args, *kwargs.values()]):
            env[node] = _constant(graph, node, args, kwargs)
        elif node.op == "call_module":
            env[node] = _module(graph.get_submodule(str(node.target)), args[0])
        elif node.op == "call_function" and node.target in MONOTONE_FUNCTIONS and isinstance(args[0], Interval):
            env[node] = args[0].map(node.target, *args[1:], **kwargs)
        elif node.op == "call_method" and node.target in MONOTONE_METHODS and isinstance(args[0], Interval):
            env[node] = args[0].map(lambda t, *a, m=node.target, **k: getattr(t, m)(*a, **k), *args[1:], **kwargs)
        elif node.op == "call_function" and node.target in (operator.add, operator.sub, operator.mul, operator.truediv):
            env[node] = _arithmetic(node.target, *args)
        else:
            raise NotCertifiable(describe(node, graph))
    return graph, env


def _constant(graph: fx.GraphModule, node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
    if node.op == "call_module":
        return graph.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def output_node(graph: fx.GraphModule) -> fx.Node:
    return next(n for n in graph.graph.nodes if n.op == "output")


def margin_bounds(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Lower bounds (batch, classes) of the margins z_y - z_j over the box (0 at j = y). When the
    logits come out of a Linear layer, the margins are bounded through it: rows of C·W."""
    graph, env = propagate(model, Interval(lower, upper))
    logits_node = output_node(graph).args[0]
    logits = env[logits_node]
    if not isinstance(logits, Interval):
        raise NotCertifiable("the output does not depend on the input")
    spec = margin_spec(y, logits.lower.shape[1])
    last = graph.get_submodule(str(logits_node.target)) if logits_node.op == "call_module" else None
    if isinstance(last, nn.Linear) and isinstance(env[logits_node.args[0]], Interval):
        inner = env[logits_node.args[0]]
        weight = spec @ last.weight  # (batch, classes, features)
        centre = (weight @ inner.mid.unsqueeze(2)).squeeze(2)
        radius = (weight.abs() @ inner.rad.unsqueeze(2)).squeeze(2)
        bias = spec @ last.bias if last.bias is not None else 0.0
        return centre - radius + bias
    true_lower = logits.lower.gather(1, y[:, None])
    margins = true_lower - logits.upper
    return margins.scatter(1, y[:, None], 0.0)


@register_verifier(
    "ibp-v1",
    norms=("linf", "l2"),
    description="interval bound propagation (Gowal et al. 2018); L2 through its enclosing Linf box (loose)",
)
class IBP(Verifier):
    def certify(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
        lower, upper = input_box(x, norm, eps)
        return certified_from_margins(margin_bounds(model, lower, upper, y), y)
