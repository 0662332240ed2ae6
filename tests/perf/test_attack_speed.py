"""Speed of the native gradient attacks against a bare autograd loop doing the same number of
forward and backward passes on the same model and batch (target: ratio <= 1.05), and of ART's
equivalent attacks on the same work. Run for real with `tox -e bench`; in a plain test run the
benchmarks execute once, as smoke tests, and the ratios are not asserted."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from attacks.art_support import art_classifier, to_numpy
from attacks.base import Victim
from bench.counting import CountingModel, PassCounter
from bench.keys import seed_everything
from bench.registry import ATTACKS
from tests.conftest import train_defense

GRADIENT_ATTACKS = [
    "fgsm-linf-v1",
    "pgd-linf-v1",
    "pgd-l2-v1",
    "pgd-l1-v1",
    "pgd-margin-linf-v1",
    "apgd-ce-linf-v1",
    "apgd-dlr-linf-v1",
    "apgd-t-linf-v1",
    "cw-l2-v1",
]
TARGET_RATIO = 1.05
EPS = {"linf": 0.2, "l2": 1.0, "l1": 3.0}
ROUNDS = 5


@pytest.fixture(scope="module")
def robust_setup(digits):
    """A robust model, so attacks run (almost) their whole budget instead of stopping early."""
    trained = train_defense("pgd-at-linf-v1", digits, epochs=8)
    index = digits.eval_indices(300)
    return trained.deployed, digits.x_test[index], digits.y_test[index]


def bare_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, forwards: int, backwards: int) -> None:
    """The same per-example work as an attack, with nothing else: full-batch forward+backward
    passes, then forward-only passes for the remaining forwards."""
    n = len(x)
    for done in range(0, backwards, n):
        chunk = x[: min(n, backwards - done)].detach().requires_grad_(True)
        loss = F.cross_entropy(model(chunk), y[: len(chunk)])
        torch.autograd.grad(loss, chunk)
    with torch.no_grad():
        for done in range(0, max(0, forwards - backwards), n):
            model(x[: min(n, forwards - backwards - done)])


def _mean_time(function, rounds: int = ROUNDS) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        function()
    return (time.perf_counter() - start) / rounds


@pytest.mark.parametrize("attack_id", GRADIENT_ATTACKS)
def test_native_attack_vs_bare_loop(benchmark, robust_setup, attack_id):
    model, x, y = robust_setup
    spec = ATTACKS.get(attack_id)
    attack = spec.make("digits", eps=EPS[spec.norm])
    counter = PassCounter()
    victim = Victim(CountingModel(model, counter), 10)

    def run() -> None:
        counter.forwards = counter.backwards = 0
        seed_everything(0)
        attack(victim, x, y)

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    forwards, backwards = counter.forwards, counter.backwards
    assert backwards > 0
    if benchmark.disabled:
        return
    ours = benchmark.stats.stats.mean
    bare = _mean_time(lambda: bare_loop(model, x, y, forwards, backwards))
    benchmark.extra_info.update(bare_loop_seconds=bare, ratio=ours / bare, forwards=forwards, backwards=backwards)
    assert ours / bare <= TARGET_RATIO, f"{attack_id}: {ours / bare:.2f}x a bare autograd loop"


@pytest.mark.parametrize("attack_id", ["pgd-linf-v1", "apgd-ce-linf-v1"])
def test_art_equivalent_on_the_same_work(benchmark, robust_setup, attack_id):
    """ART's PGD (on the device) and APGD (numpy every step) on the same model, batch and budget;
    the ratio to ours is reported in the benchmark's extra info."""
    from art.attacks.evasion import AutoProjectedGradientDescent, ProjectedGradientDescentPyTorch

    model, x, y = robust_setup
    classifier = art_classifier(model, x, 10)
    steps = ATTACKS.get(attack_id).resolve_kwargs("digits")["steps"]
    if attack_id.startswith("pgd"):
        art_attack = ProjectedGradientDescentPyTorch(
            classifier,
            norm=np.inf,
            eps=0.2,
            eps_step=2.5 * 0.2 / steps,
            max_iter=steps,
            num_random_init=1,
            batch_size=len(x),
            verbose=False,
        )
    else:
        art_attack = AutoProjectedGradientDescent(
            classifier,
            norm=np.inf,
            eps=0.2,
            eps_step=0.4,
            max_iter=steps,
            nb_random_init=1,
            batch_size=len(x),
            loss_type="cross_entropy",
            verbose=False,
        )
    x_np, y_np = to_numpy(x), y.numpy()
    benchmark.pedantic(
        lambda: art_attack.generate(x_np, y=y_np), rounds=ROUNDS if not benchmark.disabled else 1, iterations=1
    )
    if benchmark.disabled:
        return
    ours_attack = ATTACKS.get(attack_id).make("digits", eps=0.2)
    ours = _mean_time(lambda: ours_attack(Victim(model, 10), x, y))
    benchmark.extra_info.update(ours_seconds=ours, art_over_ours=benchmark.stats.stats.mean / ours)


def test_cascade_costs_less_than_every_member_on_every_example(benchmark, robust_setup):
    model, x, y = robust_setup
    members = [["apgd-ce-linf-v1", {}], ["apgd-t-linf-v1", {}], ["square-linf-v1", {}], ["pgd-linf-v1", {}]]
    cascade = ATTACKS.get("adaptive-worst-case-linf-v1").make("digits", {"members": members}, eps=0.2)
    counter = PassCounter()

    def run() -> None:
        counter.forwards = counter.backwards = 0
        seed_everything(0)
        cascade(Victim(CountingModel(model, counter), 10), x, y)

    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 3, iterations=1)
    separate = PassCounter()
    start = time.perf_counter()
    for attack_id, kwargs in members:
        seed_everything(0)
        ATTACKS.get(attack_id).make("digits", kwargs, eps=0.2)(Victim(CountingModel(model, separate), 10), x, y)
    separate_seconds = time.perf_counter() - start
    benchmark.extra_info.update(
        cascade_passes=counter.forwards + counter.backwards,
        all_members_passes=separate.forwards + separate.backwards,
        all_members_seconds=separate_seconds,
    )
    assert counter.forwards + counter.backwards < separate.forwards + separate.backwards
