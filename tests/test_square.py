"""The Square attack: the paper's L2 update and Linf redraw, batched, and its strength at the default
digits budget against white-box PGD on an undefended model (a black-box masking detector must come
close to the white-box attacks where nothing is masked)."""

from __future__ import annotations

import pytest
import torch

from attacks.base import Victim, perturbation_norm, predict
from attacks.square import Square, centred_pattern, meta_pattern, paste, window_mask
from bench.foundation.keys import seed_everything
from bench.foundation.registry import ATTACKS


def test_centred_pattern_peaks_at_the_centre_and_falls_ring_by_ring():
    pattern = centred_pattern(5, 5)
    assert torch.isclose(pattern.norm(), torch.tensor(1.0, dtype=pattern.dtype))
    assert pattern.argmax() == 12, "the centre pixel"
    ring = [pattern[2, 2], pattern[1, 1], pattern[0, 0]]
    assert ring[0] > ring[1] > ring[2] > 0
    assert torch.equal(pattern, pattern.flip(0)) and torch.equal(pattern, pattern.T)
    assert torch.isclose(pattern[1, 2], pattern[1, 1]), "constant on a ring (Chebyshev distance)"


def test_meta_pattern_is_two_centred_halves_of_opposite_sign():
    pattern = meta_pattern(5)
    assert torch.isclose(pattern.norm(), torch.tensor(1.0, dtype=pattern.dtype))
    assert (pattern[:2] > 0).all() and (pattern[2:] < 0).all()
    assert torch.allclose(pattern[:2] / pattern[:2].norm(), centred_pattern(2, 5) / centred_pattern(2, 5).norm())
    assert torch.allclose(-pattern[2:] / pattern[2:].norm(), centred_pattern(3, 5) / centred_pattern(3, 5).norm())


def test_paste_places_each_patch_at_its_own_corner():
    patches = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3) + 1
    corners = torch.tensor([[0, 0], [4, 5]])
    canvas = paste(patches, corners, 8, 8)
    assert torch.equal(canvas[0, :, 0:3, 0:3], patches[0]) and torch.equal(canvas[1, :, 4:7, 5:8], patches[1])
    assert torch.equal(canvas != 0, window_mask(corners, 8, 8, 3).expand_as(canvas))


def test_l2_update_moves_the_mass_of_two_windows_into_the_first_and_keeps_norm_eps():
    """Away from the box (x = 0.5 everywhere and eps small enough that nothing is clipped) every
    proposal has norm exactly eps and changes at most two windows of the perturbation."""
    torch.manual_seed(0)
    x = torch.full((64, 1, 8, 8), 0.5)
    eps = torch.full((64,), 0.4)
    attack = Square(0.4, norm="l2", queries=100, p_init=0.3)
    current = attack._initial_l2(x)
    assert torch.allclose(perturbation_norm(current - x, "l2"), eps, atol=1e-5)
    for iteration in (0, 50):
        side = attack._side(iteration, 8, 8)
        proposal = attack._propose_l2(x, current, iteration)
        assert proposal.min() > 0 and proposal.max() < 1, "the test needs a point away from the box"
        assert torch.allclose(perturbation_norm(proposal - x, "l2"), eps, atol=1e-5)
        changed = ((proposal - current).abs() > 1e-6).flatten(1).sum(1)
        assert (changed <= 2 * side * side).all()
        # (a proposal may repeat the window's content: same window, sign and orientation drawn again)
        assert (changed > 0).float().mean() > 0.9
        current = proposal


def test_linf_proposals_always_change_the_window():
    """A proposal equal to the current point would waste a query: it is redrawn (the paper's rule).
    Here every pixel already sits at +eps, so half of the raw draws would change nothing."""
    torch.manual_seed(0)
    x = torch.full((256, 1, 8, 8), 0.5)
    attack = Square(0.1, norm="linf", queries=100)
    current = x + 0.1
    for iteration in range(0, 100, 10):
        proposal = attack._propose_linf(x, current, iteration)
        assert ((proposal - current).abs() > 1e-7).flatten(1).any(dim=1).all()
        assert perturbation_norm(proposal - x, "linf").max() <= 0.1 + 1e-6


def _robust_accuracy(attack_id: str, trained, x, y, eps: float) -> float:
    attack = ATTACKS.get(attack_id).make("digits", eps=eps)
    seed_everything(0)
    x_adv = attack(Victim(trained.deployed, 10), x, y)
    return float((predict(trained.deployed, x_adv) == y).float().mean())


@pytest.mark.parametrize(
    "norm, eps, tolerance",
    [("linf", 0.15, 0.03), ("linf", 0.2, 0.03), ("l2", 1.25, 0.08)],
)
def test_square_comes_close_to_pgd_on_an_undefended_model(standard_digits, eval_batch, norm, eps, tolerance):
    """At the default digits budget (250 Linf / 300 L2 queries). Measured on this model and batch:
    Linf 0.15 / 0.2: Square 0.225 / 0.045 vs PGD 0.21 / 0.04 (80 queries of the old search: 0.40 at
    0.2); L2 1.25: 0.045 vs 0.0. L2 Square stays the weaker one on 8x8 images — at L2 1.0 it keeps
    0.19 where PGD keeps 0.065 (the old Gaussian search with 80 queries: 0.82)."""
    x, y = eval_batch
    square = _robust_accuracy(f"square-{norm}-v1", standard_digits, x, y, eps)
    pgd = _robust_accuracy(f"pgd-{norm}-v1", standard_digits, x, y, eps)
    assert square <= pgd + tolerance, f"Square {square:.3f} vs PGD {pgd:.3f}"
