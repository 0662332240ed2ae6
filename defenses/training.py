"""The one training loop every defense shares; a defense supplies only its per-batch loss.

Everything stays on the training device: shuffling, augmentation and adversarial example crafting.
Hyperparameters are spec kwargs with per-dataset defaults: quick ones for digits on a CPU, the
published ones (Madry et al. for MNIST, Rice et al. for CIFAR-10) elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bench.foundation.counting import CountingModel
from bench.foundation.errors import RobustMatrixError
from bench.foundation.specs import TrainedAgainst, TrainingThreat
from defenses.base import TrainContext, TrainData

BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(model, x, y, epoch) -> scalar loss to minimise. ``model`` counts its passes."""

TRAINING_KWARGS: dict[str, Any] = {
    "epochs": 20,
    "batch_size": 64,
    "optimizer": "adam",
    "lr": 1e-3,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "schedule": "constant",
    "augment": False,
}

_MNIST_PUBLISHED = {"epochs": 100, "batch_size": 50, "optimizer": "adam", "lr": 1e-4}
DATASET_TRAINING_KWARGS: dict[str, dict[str, Any]] = {
    "mnist": _MNIST_PUBLISHED,
    "mnist-t10k": _MNIST_PUBLISHED,
    "fashion-mnist": _MNIST_PUBLISHED,
    "cifar10": {
        "epochs": 200,
        "batch_size": 128,
        "optimizer": "sgd",
        "lr": 0.1,
        "weight_decay": 5e-4,
        "schedule": "piecewise",
        "augment": True,
    },
}


def with_training_defaults(
    kwargs: Mapping[str, Any], per_dataset: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(kwargs, dataset_kwargs) for a spec: the shared training defaults plus the defense's own."""
    merged_datasets = {name: dict(values) for name, values in DATASET_TRAINING_KWARGS.items()}
    for name, values in (per_dataset or {}).items():
        merged_datasets.setdefault(name, {}).update(values)
    return {**TRAINING_KWARGS, **kwargs}, merged_datasets


def _lr_factor(schedule: str, progress: float) -> float:
    """Learning-rate multiplier at a fraction ``progress`` of training."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "piecewise":
        return 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01
    if schedule == "cyclic":
        return progress / 0.4 if progress < 0.4 else max(0.0, (1 - progress) / 0.6)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def crop_flip(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random crops after reflection padding, and random horizontal flips, per example on the device."""
    batch, channels, height, width = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    top = torch.randint(0, 2 * pad + 1, (batch,), device=x.device)
    left = torch.randint(0, 2 * pad + 1, (batch,), device=x.device)
    rows = (top[:, None] + torch.arange(height, device=x.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(width, device=x.device))[:, None, None, :]
    index = torch.arange(batch, device=x.device)[:, None, None, None]
    channel = torch.arange(channels, device=x.device)[None, :, None, None]
    out = padded[index, channel, rows, cols]
    flip = torch.rand(batch, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def _optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use adam or sgd")


def train(
    model: nn.Module,
    data: TrainData,
    ctx: TrainContext,
    batch_loss: BatchLoss,
    *,
    epochs: int,
    batch_size: int,
    optimizer: str,
    lr: float,
    momentum: float,
    weight_decay: float,
    schedule: str,
    augment: bool,
    **_: Any,
) -> list[float]:
    """Minimise ``batch_loss`` over shuffled minibatches; returns the mean loss of each epoch."""
    counted = CountingModel(model, ctx.counter)
    opt = _optimizer(model, optimizer, lr, momentum, weight_decay)
    generator = ctx.generator()
    n = len(data.y)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    history = []
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator).to(data.x.device)
        running, seen = torch.zeros((), device=data.x.device), 0
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            x, y = data.x[index], data.y[index]
            if augment:
                x = crop_flip(x)
            for group in opt.param_groups:
                group["lr"] = lr * _lr_factor(schedule, step / total_steps)
            model.train()
            loss = batch_loss(counted, x, y, epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.detach() * len(y)
            seen += len(y)
            step += 1
        history.append(running.item() / max(seen, 1))
        ctx.on_epoch(epoch + 1, epochs, history[-1])
    model.eval()
    return history


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Craft adversarial examples in eval mode — the attack's passes must not update batch-norm
    statistics or draw dropout masks — and restore the model's previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def transformed(transform: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``transform`` applied to a whole split once, in chunks, without gradients (for deterministic
    input transformations: the training set is transformed once instead of every epoch)."""
    with torch.no_grad():
        return torch.cat([transform(x[i : i + chunk]) for i in range(0, len(x), chunk)]) if len(x) else x


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: Any, minimum: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def require(condition: bool, message: str) -> None:
    """Reject a bad defense kwarg when the defense is built, as a one-line user error."""
    if not condition:
        raise RobustMatrixError(message)


TRAINING_NORMS = ("linf", "l2")


@dataclass(frozen=True)
class NormKwargThreat(TrainingThreat):
    """A trained-against declaration whose norm, like its eps, is read from the defense's kwargs
    (``norm_kwarg``): a defense whose ``norm`` kwarg accepts linf and l2 must not declare linf when it
    was trained with ``{"norm": "l2"}``. The ``norm`` field is the registration's default norm; the
    resolved declaration (what the runner stores and the leaderboard reads) takes the kwarg's."""

    norm_kwarg: str = "norm"

    def resolve(self, kwargs: Mapping[str, Any], defense_id: str) -> TrainedAgainst:
        resolved = super().resolve(kwargs, defense_id)
        norm = kwargs.get(self.norm_kwarg)
        if norm not in TRAINING_NORMS:
            raise RobustMatrixError(
                f"defense {defense_id} declares training against the norm of kwarg '{self.norm_kwarg}', "
                f"which must be one of {', '.join(TRAINING_NORMS)}, got {norm!r}"
            )
        return replace(resolved, norm=norm)


def check_pgd_kwargs(name: str, norm: str, eps: float, steps: int, rel_step: float) -> None:
    """The inner-maximization kwargs adversarial training defenses share."""
    require(norm in TRAINING_NORMS, f"{name}: norm must be linf or l2, got {norm!r}")
    require(is_number(eps) and eps > 0, f"{name}: eps must be a number > 0, got {eps!r}")
    require(is_count(steps), f"{name}: steps must be an integer >= 1, got {steps!r}")
    require(is_number(rel_step) and rel_step > 0, f"{name}: rel_step must be a number > 0, got {rel_step!r}")


OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "piecewise", "cyclic")


def training_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of a defense's kwargs that the loop itself takes, checked before any training."""
    loop = {key: kwargs[key] for key in TRAINING_KWARGS}
    require(
        loop["optimizer"] in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {loop['optimizer']!r}"
    )
    require(loop["schedule"] in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {loop['schedule']!r}")
    for key in ("epochs", "batch_size"):
        require(is_count(loop[key]), f"{key} must be an integer >= 1, got {loop[key]!r}")
    for key in ("lr", "momentum", "weight_decay"):
        require(is_number(loop[key]) and loop[key] >= 0, f"{key} must be a number >= 0, got {loop[key]!r}")
    require(isinstance(loop["augment"], bool), f"augment must be true or false, got {loop['augment']!r}")
    return loop
