"""The rules inside AutoAttack's components, pinned against hand-computed values and the reference
code: what a one-sided "at least as strong as ART" check cannot see (a schedule off by one
iteration, a loss with the wrong denominator still breaks an undefended model)."""

from __future__ import annotations

import pytest
import torch

from attacks.apgd import checkpoints, halve_step
from attacks.base import dlr_loss, targeted_dlr_loss
from attacks.square import window_fraction

LOGITS = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.5, 4.0, -1.0, 2.0]])


def test_dlr_is_the_margin_over_the_gap_between_first_and_third_logit():
    # Row 0, true class 0: sorted 3, 2, 1, 0; margin 2 - 3 = -1 over 3 - 1 = 2.
    # Row 1, true class 3: sorted 4, 2, 0.5, -1; margin 4 - 2 = 2 over 4 - 0.5 = 3.5.
    values = dlr_loss(LOGITS, torch.tensor([0, 3]))
    assert values.tolist() == pytest.approx([-0.5, 2 / 3.5])


def test_targeted_dlr_is_target_minus_true_over_first_minus_mean_of_third_and_fourth():
    # Row 0, y 0, target 2: (2 - 3) / (3 - (1 + 0) / 2) = -1 / 2.5.
    # Row 1, y 1, target 3: (2 - 4) / (4 - (0.5 - 1) / 2) = -2 / 4.25.
    values = targeted_dlr_loss(LOGITS, torch.tensor([0, 1]), torch.tensor([2, 3]))
    assert values.tolist() == pytest.approx([-0.4, -2 / 4.25])


def test_dlr_does_not_change_with_the_scale_or_shift_of_the_logits():
    y = torch.tensor([0, 3])
    assert dlr_loss(7 * LOGITS + 3, y).tolist() == pytest.approx(dlr_loss(LOGITS, y).tolist())


def test_apgd_checkpoints_follow_the_paper():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (increments shrink by 0.03, floor 0.06).
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1000) == [220, 410, 570, 700, 800, 870, 930, 990]
    assert checkpoints(25) == [6, 11, 15, 18, 20, 22, 24]  # ceil(p x 25), the last (24.75) dropped


def test_apgd_checkpoints_match_the_reference_where_its_integer_schedule_is_exact():
    autopgd = pytest.importorskip("autoattack.autopgd_base", reason="the reference autoattack is not installed")
    for steps in (100, 1000):
        reference = autopgd.APGDAttack(torch.nn.Identity(), n_iter=steps, eps=0.1, device="cpu")
        reference.init_hyperparam(torch.zeros(1, 1))
        length, counter, points = reference.n_iter_2, 0, []
        for iteration in range(steps):  # the reference's own loop, lines "counter3 == k"
            counter += 1
            if counter == length:
                points.append(iteration + 1)
                counter, length = 0, max(length - reference.size_decr, reference.n_iter_min)
        assert checkpoints(steps) == points


def test_the_step_halves_when_the_loss_rose_too_rarely_or_stalled_without_a_halving():
    rho, since = 0.75, 10
    increases = torch.tensor([5.0, 8.0, 8.0, 8.0])
    halved_last_time = torch.tensor([False, False, False, True])
    best = torch.tensor([1.0, 1.0, 2.0, 1.0])
    best_before = torch.tensor([0.0, 1.0, 1.0, 1.0])
    halve = halve_step(increases, since, rho, halved_last_time, best, best_before)
    # 0: rose in 5 of 10 steps < 7.5 -> halve. 1: rose often, but no improvement and not halved last
    # time -> halve. 2: rose often and improved -> keep. 3: no improvement, but halved last time -> keep.
    assert halve.tolist() == [True, True, False, False]
    assert not halve_step(torch.tensor([7.5]), since, rho, torch.tensor([False]), best[:1], best_before[:1]).item()


def test_square_windows_halve_on_the_papers_schedule():
    # Rescaled to 1000 queries, the halvings at 10, 50, 200, ... of 10,000 fall at 1, 5, 20, 50, ...
    fractions = [window_fraction(0.8, it, 1000) for it in (0, 1, 2, 5, 6, 20, 21, 50, 51, 100, 101, 999)]
    assert fractions == pytest.approx([0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05, 0.025, 0.8 / 512])


def test_square_schedule_matches_the_reference_with_and_without_rescaling():
    square = pytest.importorskip("autoattack.square", reason="the reference autoattack is not installed")
    for queries, rescale in ((5000, False), (5000, True), (300, True)):
        reference = square.SquareAttack(torch.nn.Identity(), p_init=0.8, n_queries=queries, resc_schedule=rescale)
        ours = [window_fraction(0.8, it, queries, rescale) for it in range(queries)]
        assert ours == pytest.approx([reference.p_selection(it) for it in range(queries)])
