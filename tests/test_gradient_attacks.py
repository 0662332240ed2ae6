"""Strength and mechanics of the native gradient attacks on a real (small) digits model."""

from __future__ import annotations

import torch

from attacks.base import Victim, clip_to_threat, perturbation_norm, predict, project
from attacks.fgsm import FGSM
from attacks.pgd import PGD
from bench.keys import seed_everything


def _robust_accuracy(attack, trained, x, y) -> float:
    seed_everything(0)
    x_adv = attack(Victim(trained.deployed, 10), x, y)
    return float((predict(trained.deployed, x_adv) == y).float().mean())


def test_pgd_is_at_least_as_strong_as_fgsm(standard_digits, eval_batch):
    x, y = eval_batch
    fgsm = _robust_accuracy(FGSM(0.1), standard_digits, x, y)
    pgd = _robust_accuracy(PGD(0.1, steps=20), standard_digits, x, y)
    clean = float((predict(standard_digits.deployed, x) == y).float().mean())
    assert pgd <= fgsm < clean
    assert pgd < 0.8 * clean, "PGD at eps 0.1 should break a good share of an undefended digits model"


def test_more_steps_and_restarts_do_not_weaken_pgd(standard_digits, eval_batch):
    x, y = eval_batch
    weak = _robust_accuracy(PGD(0.1, steps=2), standard_digits, x, y)
    strong = _robust_accuracy(PGD(0.1, steps=20, restarts=3), standard_digits, x, y)
    assert strong <= weak


def test_pgd_reaches_chance_at_a_large_eps(standard_digits, eval_batch):
    x, y = eval_batch
    assert _robust_accuracy(PGD(0.5, steps=20), standard_digits, x, y) <= 0.02


def test_projections_land_in_the_ball_and_box():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8)
    for norm, eps in (("linf", 0.1), ("l2", 1.0), ("l1", 3.0)):
        noisy = x + torch.randn_like(x)
        clipped = clip_to_threat(x, noisy, norm, eps)
        assert clipped.min() >= 0 and clipped.max() <= 1
        assert perturbation_norm(clipped - x, norm).max() <= eps * (1 + 1e-5)
        small = 1e-3 * torch.randn_like(x)
        assert torch.allclose(project(small, norm, eps), small), f"{norm} projection moved an inside point"


def test_l1_projection_is_the_euclidean_projection():
    """Against a brute-force check: the projection is no farther than any other point of the ball we try."""
    torch.manual_seed(1)
    delta = torch.randn(4, 30)
    eps = 2.0
    projected = project(delta, "l1", eps)
    assert torch.allclose(projected.abs().sum(1), torch.full((4,), eps), atol=1e-4)
    for _ in range(200):
        candidate = project(delta + 0.3 * torch.randn_like(delta), "l1", eps)
        assert ((delta - projected).norm(dim=1) <= (delta - candidate).norm(dim=1) + 1e-5).all()
