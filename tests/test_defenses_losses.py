"""The per-batch losses of TRADES, MART and multi-perturbation training, against values computed by
hand on tiny tensors. Logits are logs of chosen probabilities, so every expected value is a short
expression in logs; each case is picked so that the usual slips (KL in the wrong direction, MART's
(1 − p_y) weight dropped or taken on the adversarial input, the runner-up including the true class,
max and mean swapped or taken over the wrong axis) change the result."""

from __future__ import annotations

import math

import pytest
import torch

from attacks.base import random_start
from defenses.mart import mart_loss
from defenses.multi_at import combine
from defenses.trades import kl_examples, kl_from_clean, trades_loss


def logits_of(*rows: list[float]) -> torch.Tensor:
    """Logits whose softmax is each row normalised (rows are unnormalised probabilities)."""
    return torch.log(torch.tensor(rows, dtype=torch.float64))


ln = math.log


def test_kl_from_clean_is_kl_of_the_clean_prediction_from_the_adversarial_one():
    # p_clean = (1/2, 1/2), p_adv = (1/4, 3/4): KL(p_clean ‖ p_adv) = ½ ln 2 + ½ ln(2/3) = ½ ln(4/3);
    # the reverse direction would be ¼ ln(1/2) + ¾ ln(3/2) ≈ 0.131, not ≈ 0.144.
    clean_probs = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    adv_logits = logits_of([1, 3], [1, 1])
    kl = kl_from_clean(adv_logits, clean_probs)
    assert kl.shape == (2,)
    assert torch.allclose(kl, torch.tensor([0.5 * ln(4 / 3), 0.0], dtype=torch.float64), atol=1e-12)


def test_trades_loss_is_clean_cross_entropy_plus_beta_times_kl_from_clean():
    logits_clean = logits_of([1, 1], [1, 1])
    logits_adv = logits_of([1, 3], [1, 1])
    y = torch.tensor([0, 1])
    # example 1: CE(p_clean, 0) = ln 2, KL = ½ ln(4/3); example 2: CE = ln 2, KL = 0. Batch mean, β = 2.
    expected = ((ln(2) + 2 * 0.5 * ln(4 / 3)) + (ln(2) + 0.0)) / 2
    assert trades_loss(logits_clean, logits_adv, y, beta=2.0).item() == pytest.approx(expected, abs=1e-12)
    # β = 0 leaves the clean cross-entropy alone (not the adversarial one: that would be (ln 4 + ln 2)/2)
    assert trades_loss(logits_clean, logits_adv, y, beta=0.0).item() == pytest.approx(ln(2), abs=1e-12)


def test_mart_loss_matches_the_paper_on_hand_computed_values():
    # p_clean = (1/2, 1/3, 1/6) for both examples, p_adv = (1/4, 1/2, 1/4) for both; labels 0 and 1.
    logits_clean = logits_of([3, 2, 1], [3, 2, 1])
    logits_adv = logits_of([1, 2, 1], [1, 2, 1])
    y = torch.tensor([0, 1])
    beta = 3.0
    kl = 0.5 * ln(2) + (1 / 3) * ln((1 / 3) / (1 / 2)) + (1 / 6) * ln((1 / 6) / (1 / 4))  # KL(p_clean ‖ p_adv)
    assert kl == pytest.approx(0.5 * ln(4 / 3))
    # y = 0: BCE = −ln p_0(x') − ln(1 − max_{k≠0} p_k(x')) = −ln ¼ − ln(1 − ½)
    # y = 1: the runner-up excludes the true class (½): −ln ½ − ln(1 − ¼)
    bce = (-ln(1 / 4) - ln(1 - 1 / 2), -ln(1 / 2) - ln(1 - 1 / 4))

    def loss(weights: tuple[float, float]) -> float:
        return sum(b + beta * kl * w for b, w in zip(bce, weights, strict=True)) / 2

    expected = loss((1 - 1 / 2, 1 - 1 / 3))  # weights 1 − p_y(x): ½ and 2/3
    assert mart_loss(logits_clean, logits_adv, y, beta).item() == pytest.approx(expected, abs=1e-12)
    # the slips this rules out are each a different number: no weight, the weight taken on x', and a
    # runner-up that includes the true class
    included = (bce[0], -ln(1 / 2) - ln(1 - 1 / 2))
    slips = [
        loss((1, 1)),
        loss((1 - 1 / 4, 1 - 1 / 2)),
        sum(b + beta * kl * w for b, w in zip(included, (0.5, 2 / 3), strict=True)) / 2,
    ]
    assert all(abs(expected - slip) > 1e-3 for slip in slips)


def test_mart_loss_is_finite_when_the_adversarial_prediction_is_certain():
    logits_clean = torch.tensor([[0.0, 0.0, 0.0]])
    logits_adv = torch.tensor([[0.0, 200.0, 0.0]])  # the runner-up probability is 1 in float32
    loss = mart_loss(logits_clean, logits_adv, torch.tensor([0]), beta=6.0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("strategy, expected", [("max", (3 + 4 + 5) / 3), ("avg", 15 / 6)])
def test_combine_takes_the_worst_attack_per_example_or_the_mean(strategy, expected):
    # rows are attacks, columns examples: the per-example max is (3, 4, 5); a max per attack over
    # examples would give (4 + 5) / 2, a max of the attacks' means 10/3.
    losses = torch.tensor([[1.0, 4.0, 0.0], [3.0, 2.0, 5.0]])
    assert combine(losses, strategy).item() == pytest.approx(expected)


def test_combine_rejects_an_unknown_strategy():
    with pytest.raises(ValueError, match="unknown multi-perturbation strategy 'sum'"):
        combine(torch.zeros(2, 3), "sum")


@pytest.mark.parametrize("norm, eps", [("linf", 0.2), ("l2", 1.0)])
def test_trades_inner_maximization_raises_the_kl_and_stays_in_the_ball(norm, eps):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    x = torch.rand(64, 1, 8, 8)
    x_adv = kl_examples(model, x, norm, eps, steps=5, step_size=eps / 4)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean = torch.softmax(model(x), dim=1)
        kl_adv = kl_from_clean(model(x_adv), clean).mean()
        kl_random = kl_from_clean(model(random_start(x, norm, eps)), clean).mean()
    assert kl_adv > 5 * kl_random, (kl_adv, kl_random)
