"""Guarantees every registered attack keeps — parametrized over the registry, so a new attack is
tested the moment it is registered (the timm pattern)."""

from __future__ import annotations

import pytest
import torch

from attacks.base import Victim, perturbation_norm
from bench.counting import CountingModel, PassCounter
from bench.keys import seed_everything
from bench.registry import ATTACKS

TEST_EPS = {"linf": 0.2, "l2": 1.5, "l1": 6.0}
N_EXAMPLES = 40

ALL_ATTACKS = ATTACKS.ids()


def _eps(spec) -> float:
    if spec.eps_grid:
        return spec.eps_grid[0]
    return TEST_EPS.get(spec.norm, 0.0)


def _run(spec, trained, x, y, seed=0):
    counter = PassCounter()
    victim = Victim(
        CountingModel(trained.deployed, counter),
        num_classes=10,
        gradient_model=CountingModel(trained.deployed, counter),
        surrogate=trained.deployed,
    )
    attack = spec.make("digits", eps=_eps(spec))
    seed_everything(seed)
    return attack(victim, x, y), counter, attack


@pytest.mark.parametrize("attack_id", ALL_ATTACKS)
def test_adversarial_examples_stay_in_the_threat_model(attack_id, standard_digits, eval_batch):
    spec = ATTACKS.get(attack_id)
    x, y = eval_batch[0][:N_EXAMPLES], eval_batch[1][:N_EXAMPLES]
    x_adv, _, _ = _run(spec, standard_digits, x, y)
    assert x_adv.shape == x.shape and torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if spec.norm in TEST_EPS:
        assert perturbation_norm(x_adv - x, spec.norm).max() <= _eps(spec) * (1 + 1e-4) + 1e-5


@pytest.mark.parametrize("attack_id", ALL_ATTACKS)
def test_attacks_never_modify_labels_inputs_or_model(attack_id, standard_digits, eval_batch):
    spec = ATTACKS.get(attack_id)
    x, y = eval_batch[0][:N_EXAMPLES].clone(), eval_batch[1][:N_EXAMPLES].clone()
    x_before, y_before = x.clone(), y.clone()
    weights = {k: v.clone() for k, v in standard_digits.model.state_dict().items()}
    _run(spec, standard_digits, x, y)
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    for name, value in standard_digits.model.state_dict().items():
        assert torch.equal(value, weights[name]), f"{attack_id} changed model weight {name}"


@pytest.mark.parametrize("attack_id", ALL_ATTACKS)
def test_a_fixed_seed_gives_identical_results(attack_id, standard_digits, eval_batch):
    spec = ATTACKS.get(attack_id)
    x, y = eval_batch[0][:N_EXAMPLES], eval_batch[1][:N_EXAMPLES]
    first, _, _ = _run(spec, standard_digits, x, y, seed=3)
    second, _, _ = _run(spec, standard_digits, x, y, seed=3)
    assert torch.equal(first, second)


@pytest.mark.parametrize("attack_id", ALL_ATTACKS)
def test_declared_budget_is_respected(attack_id, standard_digits, eval_batch):
    spec = ATTACKS.get(attack_id)
    x, y = eval_batch[0][:N_EXAMPLES], eval_batch[1][:N_EXAMPLES]
    _, counter, attack = _run(spec, standard_digits, x, y)
    bound = attack.max_passes_per_example()
    assert bound is not None, f"{attack_id} must declare max_passes_per_example()"
    forwards, backwards = bound
    assert counter.forwards <= forwards * len(x)
    assert counter.backwards <= backwards * len(x)
