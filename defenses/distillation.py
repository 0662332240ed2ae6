"""Defensive distillation (Papernot et al. 2016): a teacher trained with its softmax at temperature
T, a student of the same architecture trained on the teacher's soft labels at the same T, and the
student deployed at T = 1.

Deployed at T = 1, the student's logits are about T times larger than a normal model's, so its
softmax saturates: cross-entropy gradients underflow to exactly zero and cross-entropy attacks
report it as very robust. That is gradient masking, not robustness — a logit-margin attack
(Carlini & Wagner 2017) breaks it — and the defense says so by declaring ``saturates_softmax``; the
runner then pairs it with logit-space attacks. We reproduce the masking faithfully on purpose.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bench.foundation.counting import CountingModel
from bench.foundation.registry import register_defense
from defenses.base import Defense, TrainContext, TrainData
from defenses.training import is_count, is_number, require, train, training_kwargs, with_training_defaults


def reinitialized(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with freshly drawn weights (from torch's global RNG, which the runner seeds)."""
    fresh = copy.deepcopy(model)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return fresh


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


# Papernot et al. 2016, Table 1: MNIST SGD lr 0.1, momentum 0.5, batch 128, 50 epochs;
# CIFAR-10 SGD lr 0.01, momentum 0.9, batch 128, 50 epochs. Both at T = 100 in their main results.
_MNIST = {"epochs": 50, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.5}
KWARGS, DATASET_KWARGS = with_training_defaults(
    {"temperature": 100.0, "teacher_epochs": None},
    {
        "mnist": _MNIST,
        "mnist-t10k": _MNIST,
        "fashion-mnist": _MNIST,
        "cifar10": {"epochs": 50, "batch_size": 128, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9},
    },
)


@register_defense(
    "distillation-v1",
    saturates_softmax=True,
    kwargs=KWARGS,
    dataset_kwargs=DATASET_KWARGS,
    description="Defensive distillation at temperature T, deployed at T = 1 (Papernot et al. 2016); "
    "its softmax saturates, masking cross-entropy gradients",
)
class DefensiveDistillation(Defense):
    """``teacher_epochs`` None means as many as the student's ``epochs``."""

    def __init__(self, temperature: float, teacher_epochs: int | None, **kwargs: Any) -> None:
        require(
            is_number(temperature) and temperature > 0, f"distillation: temperature must be > 0, got {temperature!r}"
        )
        require(
            teacher_epochs is None or is_count(teacher_epochs),
            f"distillation: teacher_epochs must be null or an integer >= 1, got {teacher_epochs!r}",
        )
        self.temperature = float(temperature)
        self.train_kwargs = training_kwargs(kwargs)
        self.teacher_epochs = self.train_kwargs["epochs"] if teacher_epochs is None else int(teacher_epochs)

    def fit(self, model: nn.Module, data: TrainData, ctx: TrainContext) -> None:
        t = self.temperature
        total = self.teacher_epochs + self.train_kwargs["epochs"]

        teacher = reinitialized(model)
        teacher_ctx = replace(ctx, on_epoch=lambda epoch, _, loss: ctx.on_epoch(epoch, total, loss))
        teacher_kwargs = {**self.train_kwargs, "epochs": self.teacher_epochs}
        train(teacher, data, teacher_ctx, lambda m, x, y, epoch: F.cross_entropy(m(x) / t, y), **teacher_kwargs)
        teacher.eval()
        # The teacher's passes are part of the defense's cost: they go through the same counter.
        counted_teacher = CountingModel(teacher, ctx.counter)

        def distillation_loss(counted: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
            with torch.no_grad():
                soft_labels = F.softmax(counted_teacher(x) / t, dim=1)
            return soft_cross_entropy(counted(x) / t, soft_labels)

        student_ctx = replace(
            ctx, on_epoch=lambda epoch, _, loss: ctx.on_epoch(self.teacher_epochs + epoch, total, loss)
        )
        train(model, data, student_ctx, distillation_loss, **self.train_kwargs)
