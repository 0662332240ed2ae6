"""APGD-T's retries: extra random starts on the survivors that came closest, and nowhere else."""

from __future__ import annotations

import math

import torch
from torch import nn

from attacks.apgd_t import APGDTargeted
from attacks.base import Victim, predict
from bench.foundation.data import load_dataset
from bench.foundation.keys import seed_everything
from tests.shared_models import robust_digits


class _Counting(nn.Module):
    """The model, recording the batch size of every forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        return self.model(x)


def _examples():
    """The PGD-trained digits model's first 250 clean-correct test examples: at Linf 0.2 a few of
    them sit on the boundary, where APGD-T at AutoAttack's budget breaks them from some starts only."""
    trained = robust_digits()
    digits = load_dataset("digits")
    x, y = digits.x_test[:250], digits.y_test[:250]
    correct = predict(trained.deployed, x) == y
    return trained, x[correct], y[correct]


def _attack(**kwargs):
    trained, x, y = _examples()
    counting = _Counting(trained.deployed)
    attack = APGDTargeted(0.2, targets=9, steps=100, **kwargs)
    seed_everything(0)
    x_adv = attack(Victim(counting, 10), x, y)
    return predict(trained.deployed, x_adv) == y, counting.sizes, attack


def test_retries_only_add_breaks_and_run_on_the_chosen_fraction_of_the_survivors():
    robust, sizes, _ = _attack()
    retried, retried_sizes, attack = _attack(retries=2, retry_fraction=0.2)
    assert not (retried & ~robust).any(), "the same seed runs the same targets first; retries only add breaks"
    assert retried.sum() < robust.sum(), "two more starts on the closest fifth break boundary examples"
    assert retried_sizes[: len(sizes)] == sizes, "every target's run first, unchanged; the retries after"
    retry_passes = retried_sizes[len(sizes) :]
    chosen = math.ceil(0.2 * int(robust.sum()))
    assert max(retry_passes) == chosen, "each retry runs on the closest fifth of the survivors only"
    forwards, backwards = attack.max_passes_per_example()
    assert sum(retried_sizes) <= forwards * len(robust)
    assert attack.declared_budget().restarts == 9 + 2
