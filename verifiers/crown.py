"""CROWN (Zhang et al. 2018): backward linear bounds for chains of Linear / Conv2d / ReLU / MaxPool2d
/ Flatten / eval-mode BatchNorm layers. Each unstable ReLU gets linear upper and lower relaxations
(the triangle's upper side, slope 0 or 1 below, whichever hugs the ReLU closer); each max pool the
bound y >= x_i for the window element with the highest lower bound, and y <= x_i when that element
dominates, else y <= max u. The margins C·z (C the specification matrix) are bounded by carrying
C backwards through the chain and concretising over the input set: for the Linf ball ∩ [0, 1] over
the box (the L1 dual norm); for L2 over the ball itself (the L2 dual norm, exact), and the tighter
of that and its enclosing box ∩ [0, 1].

Intermediate bounds (the pre-activation bounds each relaxation needs) come from CROWN itself
(``intermediate="crown"``, rows chunked to a memory budget) or from IBP (``"ibp"``: CROWN-IBP,
Zhang et al. 2020, far cheaper); either way they are intersected with IBP's, and the margins with
IBP's, so CROWN never certifies less than IBP. A model with a residual connection (not a chain) is
``NotCertifiable`` here; ``ibp-v1`` certifies it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from bench.foundation.registry import register_verifier
from verifiers.base import NotCertifiable, Verifier, certified_from_margins, input_box, margin_spec
from verifiers.graph import batchnorm_affine, describe, trace
from verifiers.ibp import Interval, affine, margin_bounds, scaled

ROW_BUDGET = 2**24
"""Floats one chunk of backward coefficient rows may hold (64 MB in float32)."""


class Layer:
    needs_bounds = False
    linear = True

    def ibp(self, box: Interval) -> Interval:
        raise NotImplementedError

    def backward(self, a: torch.Tensor, bias: torch.Tensor, box: Interval) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients ``a`` (batch, rows, *output shape) on this layer's output -> on its input."""
        raise NotImplementedError


@dataclass
class Dense(Layer):
    layer: nn.Linear

    def ibp(self, box: Interval) -> Interval:
        return affine(self.layer, box)

    def backward(self, a: torch.Tensor, bias: torch.Tensor, box: Interval) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layer.bias is not None:
            bias = bias + a @ self.layer.bias
        return a @ self.layer.weight, bias


@dataclass
class Conv(Layer):
    layer: nn.Conv2d

    def ibp(self, box: Interval) -> Interval:
        return affine(self.layer, box)

    def backward(self, a: torch.Tensor, bias: torch.Tensor, box: Interval) -> tuple[torch.Tensor, torch.Tensor]:
        conv = self.layer
        batch, rows = a.shape[:2]
        if conv.bias is not None:
            bias = bias + a.sum((-1, -2)) @ conv.bias
        height, width = box.lower.shape[-2:]
        stride, dilation, padding = conv.stride, conv.dilation, conv.padding
        size = [
            (a.shape[-2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (conv.kernel_size[i] - 1) + 1
            for i in range(2)
        ]
        extra = [height - size[0], width - size[1]]
        output_padding = [min(e, max(stride[i], dilation[i]) - 1) for i, e in enumerate(extra)]
        out = F.conv_transpose2d(
            a.flatten(0, 1), conv.weight, None, stride, padding, output_padding, conv.groups, dilation
        )
        out = F.pad(out, (0, width - out.shape[-1], 0, height - out.shape[-2]))  # inputs no output sees
        return out.view(batch, rows, *box.lower.shape[1:]), bias


@dataclass
class Elementwise(Layer):
    """x * scale + shift with constant, broadcastable scale and shift (batch norm, normalisation)."""

    scale: torch.Tensor
    shift: torch.Tensor

    def ibp(self, box: Interval) -> Interval:
        return scaled(box, self.scale, self.shift)

    def backward(self, a: torch.Tensor, bias: torch.Tensor, box: Interval) -> tuple[torch.Tensor, torch.Tensor]:
        shape = box.lower.shape[1:]
        scale = torch.broadcast_to(torch.as_tensor(self.scale, dtype=a.dtype, device=a.device), (1, *shape))[0]
        shift = torch.broadcast_to(torch.as_tensor(self.shift, dtype=a.dtype, device=a.device), (1, *shape))[0]
        return a * scale, bias + (a * shift).flatten(2).sum(-1)


@dataclass
class Reshape(Layer):
    def ibp(self, box: Interval) -> Interval:
        return box.map(torch.flatten, 1)

    def backward(self, a: torch.Tensor, bias: torch.Tensor, box: Interval) -> tuple[torch.Tensor, torch.Tensor]:
        return a.reshape(*a.shape[:2], *box.lower.shape[1:]), bias


class ReLU(Layer):
    needs_bounds = True
    linear = False

    def ibp(self, box: Interval) -> Interval:
        return box.map(F.relu)

    def backward(self, a: torch.Tensor, bias: torch.Tensor, box: Interval) -> tuple[torch.Tensor, torch.Tensor]:
        lower, upper = box.lower, box.upper
        unstable = (lower < 0) & (upper > 0)
        active = lower >= 0
        width = (upper - lower).clamp(min=1e-12)
        upper_slope = torch.where(unstable, upper / width, active.to(a.dtype))
        upper_shift = torch.where(unstable, -upper * lower / width, torch.zeros_like(lower))
        lower_slope = torch.where(unstable, (upper >= -lower).to(a.dtype), active.to(a.dtype))
        positive, negative = a.clamp(min=0), a.clamp(max=0)
        bias = bias + (negative * upper_shift.unsqueeze(1)).flatten(2).sum(-1)
        return positive * lower_slope.unsqueeze(1) + negative * upper_slope.unsqueeze(1), bias


@dataclass
class MaxPool(Layer):
    """Non-overlapping max pooling (kernel = stride, no padding)."""

    kernel: int
    needs_bounds = True
    linear = False

    def ibp(self, box: Interval) -> Interval:
        return box.map(F.max_pool2d, self.kernel)

    def _windows(self, t: torch.Tensor) -> torch.Tensor:
        """(batch, C, H', W', k*k) windows of the part of ``t`` the pool reads."""
        k = self.kernel
        b, c, h, w = t.shape
        t = t[:, :, : h // k * k, : w // k * k]
        return t.reshape(b, c, h // k, k, w // k, k).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // k, w // k, k * k)

    def backward(self, a: torch.Tensor, bias: torch.Tensor, box: Interval) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.kernel
        lower, upper = self._windows(box.lower), self._windows(box.upper)
        best_lower, chosen = lower.max(dim=-1)
        others_upper = upper.scatter(-1, chosen.unsqueeze(-1), float("-inf")).max(dim=-1).values
        dominates = best_lower >= others_upper
        top = upper.max(dim=-1).values
        positive, negative = a.clamp(min=0), a.clamp(max=0)
        on_chosen = positive + torch.where(dominates.unsqueeze(1), negative, torch.zeros_like(negative))
        bias = bias + (torch.where(dominates.unsqueeze(1), 0.0, negative) * top.unsqueeze(1)).flatten(2).sum(-1)
        one_hot = F.one_hot(chosen, k * k).to(a.dtype)  # (batch, C, H', W', k*k)
        spread = on_chosen.unsqueeze(-1) * one_hot.unsqueeze(1)
        batch, rows, c, hp, wp, _ = spread.shape
        spread = spread.reshape(batch, rows, c, hp, wp, k, k).permute(0, 1, 2, 3, 5, 4, 6)
        spread = spread.reshape(batch, rows, c, hp * k, wp * k)
        height, width = box.lower.shape[-2:]
        return F.pad(spread, (0, width - wp * k, 0, height - hp * k)), bias


def _constant(graph: fx.GraphModule, arg: object) -> torch.Tensor | float:
    if isinstance(arg, fx.Node):
        if arg.op != "get_attr":
            raise NotCertifiable("a non-constant operand off the chain")
        value: object = graph
        for part in str(arg.target).split("."):
            value = getattr(value, part)
        return value  # type: ignore[return-value]
    return arg  # type: ignore[return-value]


def chain(model: nn.Module) -> list[Layer]:
    """The model as a chain of layers, each node consuming only the one before (else NotCertifiable)."""
    graph = trace(model)
    layers: list[Layer] = []
    previous: fx.Node | None = None
    for node in graph.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            previous = node if node.op == "placeholder" else previous
            continue
        if node.op == "output":
            break
        if not node.args or node.args[0] is not previous or len(node.users) > 1:
            raise NotCertifiable(f"crown-v1 needs a chain of layers; {describe(node, graph)} branches (residual?)")
        layers.extend(_layer(graph, node))
        previous = node
    return layers


def _layer(graph: fx.GraphModule, node: fx.Node) -> list[Layer]:
    if node.op == "call_module":
        module = graph.get_submodule(str(node.target))
        if isinstance(module, nn.Linear):
            return [Dense(module)]
        if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
            return [Conv(module)]
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            scale, shift = batchnorm_affine(module)
            view = (-1, 1, 1) if isinstance(module, nn.BatchNorm2d) else (-1,)
            return [Elementwise(scale.view(*view), shift.view(*view))]
        if isinstance(module, nn.ReLU):
            return [ReLU()]
        if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            return [Reshape()]
        if isinstance(module, nn.MaxPool2d) and _plain_pool(module):
            return [MaxPool(int(_single(module.kernel_size)))]
        if isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and not module.training):
            return []
    elif node.op == "call_function":
        if node.target in (F.relu, torch.relu):
            return [ReLU()]
        if node.target is torch.flatten and tuple(node.args[1:]) in ((1,), ()) and node.args[1:] != ():
            return [Reshape()]
        if node.target in (operator.sub, operator.truediv, operator.add, operator.mul) and len(node.args) == 2:
            c = _constant(graph, node.args[1])
            ops = {
                operator.sub: (1.0, -c if not isinstance(c, float) else -c),
                operator.add: (1.0, c),
                operator.mul: (c, 0.0),
                operator.truediv: (1.0 / c, 0.0),
            }
            scale, shift = ops[node.target]
            return [Elementwise(torch.as_tensor(scale), torch.as_tensor(shift))]
    elif node.op == "call_method" and node.target == "relu":
        return [ReLU()]
    elif node.op == "call_method" and node.target == "flatten" and tuple(node.args[1:]) == (1,):
        return [Reshape()]
    raise NotCertifiable(f"crown-v1 has no relaxation for {describe(node, graph)}")


def _single(value: int | tuple[int, ...]) -> int:
    values = (value,) if isinstance(value, int) else tuple(value)
    if len(set(values)) != 1:
        raise NotCertifiable("a non-square pooling window")
    return values[0]


def _plain_pool(pool: nn.MaxPool2d) -> bool:
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return (
        _single(pool.kernel_size) == _single(stride)
        and _single(pool.padding) == 0
        and _single(pool.dilation) == 1
        and not pool.ceil_mode
    )


@dataclass(frozen=True)
class InputSet:
    """The threat model's set: its centre, norm and radius, and its enclosing box ∩ [0, 1]."""

    x: torch.Tensor
    norm: str
    eps: float
    box: Interval

    def lower_bound(self, a: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """min of a·x' + bias over the set: the box's (exact for Linf), and for L2 the better of it
        and the ball's a·x - eps·||a||_2."""
        flat = a.flatten(2)
        low, high = self.box.lower.flatten(1).unsqueeze(1), self.box.upper.flatten(1).unsqueeze(1)
        bound = (flat.clamp(min=0) * low + flat.clamp(max=0) * high).sum(-1) + bias
        if self.norm == "l2":
            ball = (flat * self.x.flatten(1).unsqueeze(1)).sum(-1) - self.eps * flat.norm(dim=-1) + bias
            bound = torch.maximum(bound, ball)
        return bound


def backward_bound(layers: list[Layer], boxes: list[Interval], spec: torch.Tensor, inputs: InputSet) -> torch.Tensor:
    """Lower bounds of spec · (output of ``layers``) over the input set (batch, rows)."""
    a, bias = spec, torch.zeros(spec.shape[:2], dtype=spec.dtype, device=spec.device)
    for layer, box in zip(reversed(layers), reversed(boxes), strict=True):
        a, bias = layer.backward(a, bias, box)
    return inputs.lower_bound(a, bias)


def _neuron_bounds(layers: list[Layer], boxes: list[Interval], known: Interval, inputs: InputSet) -> Interval:
    """``known`` (IBP's bounds of the last layer's output) tightened by CROWN on the neurons that
    are unstable (lower < 0 < upper) for some example: only those change a ReLU's relaxation.
    Rows are chunked to ROW_BUDGET."""
    batch, shape = inputs.x.shape[0], known.lower.shape[1:]
    unstable = ((known.lower < 0) & (known.upper > 0)).flatten(1).any(0).nonzero().squeeze(1)
    if not len(unstable):
        return known
    widest = max(math.prod(b.lower.shape[1:]) for b in boxes)
    rows = max(1, ROW_BUDGET // (2 * batch * widest))
    lower, upper = known.lower.flatten(1).clone(), known.upper.flatten(1).clone()
    for start in range(0, len(unstable), rows):
        chosen = unstable[start : start + rows]
        part = torch.zeros(len(chosen), math.prod(shape), dtype=inputs.x.dtype, device=inputs.x.device)
        part[torch.arange(len(chosen), device=part.device), chosen] = 1.0
        part = part.view(-1, *shape)
        spec = torch.cat([part, -part]).unsqueeze(0).expand(batch, *([-1] * part.dim()))
        bound = backward_bound(layers, boxes, spec, inputs)
        lower[:, chosen] = torch.maximum(lower[:, chosen], bound[:, : len(chosen)])
        upper[:, chosen] = torch.minimum(upper[:, chosen], -bound[:, len(chosen) :])
    return Interval(lower.view(batch, *shape), upper.view(batch, *shape))


def input_boxes(layers: list[Layer], inputs: InputSet, intermediate: str) -> list[Interval]:
    """The bounds of each layer's input: IBP's, tightened by CROWN before every ReLU and max pool."""
    boxes: list[Interval] = []
    box = inputs.box
    for k, layer in enumerate(layers):
        boxes.append(box)
        out = layer.ibp(box)
        following = layers[k + 1] if k + 1 < len(layers) else None
        if intermediate == "crown" and following is not None and following.needs_bounds and layer.linear:
            out = _neuron_bounds(layers[: k + 1], boxes, out, inputs)
        box = out
    return boxes


def crown_margins(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, intermediate: str
) -> torch.Tensor:
    """Lower bounds (batch, classes) of z_y - z_j over the threat model (0 at j = y)."""
    layers = chain(model)
    lower, upper = input_box(x, norm, eps)
    inputs = InputSet(x, norm, eps, Interval(lower, upper))
    boxes = input_boxes(layers, inputs, intermediate)
    logits = layers[-1].ibp(boxes[-1]) if layers else boxes[-1]
    spec = margin_spec(y, logits.lower.shape[1]).to(x.dtype)
    margins = backward_bound(layers, boxes, spec, inputs)
    return torch.maximum(margins, margin_bounds(model, lower, upper, y))


INTERMEDIATE = ("crown", "ibp")


@register_verifier(
    "crown-ibp-v1",
    norms=("linf", "l2"),
    variant={"intermediate": "ibp"},
    description="CROWN backward bounds on IBP intermediate bounds (CROWN-IBP, Zhang et al. 2020); chains only",
)
@register_verifier(
    "crown-v1",
    norms=("linf", "l2"),
    description="CROWN backward linear bounds (Zhang et al. 2018), CROWN intermediate bounds; chains only",
)
class CROWN(Verifier):
    def __init__(self, intermediate: str = "crown") -> None:
        if intermediate not in INTERMEDIATE:
            raise ValueError(f"intermediate must be one of {', '.join(INTERMEDIATE)}, got {intermediate!r}")
        self.intermediate = intermediate

    def certify(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
        return certified_from_margins(crown_margins(model, x, y, norm, eps, self.intermediate), y)
