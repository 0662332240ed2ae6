"""Soundness of the verifiers, on tiny networks where the truth is known or searchable densely:
bounds contain every logit reached inside the ball; certified examples survive a dense grid over the
ball and PGD; certified <= dense-search robust <= PGD robust; CROWN certifies at least what IBP does;
the smoothing radius is at most a linear classifier's analytic one and close to it. The mutation
tests plant a sign error in a relaxation and check that the containment check catches it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import verifiers.crown as crown
from attacks.base import Victim
from attacks.pgd import PGD
from bench.foundation.models import PreActResNet18, SmallCNN
from bench.foundation.registry import VERIFIERS
from verifiers.ibp import margin_bounds
from verifiers.smoothing import SmoothedClassifier, certified_radius

torch.set_num_threads(1)


def tiny_net(seed: int, inputs: int = 2, hidden: int = 12, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
    ).eval()
    with torch.no_grad():  # sharper than the default init: decision boundaries inside the unit square
        for layer in net[::2]:
            layer.weight.mul_(3.0)
    return net


def samples_in_ball(x: torch.Tensor, norm: str, eps: float, n: int) -> torch.Tensor:
    """(n, batch, ...) points of the ball ∩ [0, 1], corners and surface included."""
    shape = (n, *x.shape)
    if norm == "linf":
        delta = eps * torch.sign(torch.randn(shape)) * torch.rand(shape).pow(0.25)
    else:
        direction = torch.randn(shape)
        direction = direction / direction.flatten(2).norm(dim=-1).view(n, len(x), *[1] * (x.dim() - 1))
        delta = eps * direction * torch.rand(n, len(x), *[1] * (x.dim() - 1)).pow(0.25)
    return (x + delta).clamp(0, 1)


def margins_of(model: nn.Module, points: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(points.flatten(0, 1)).view(points.shape[0], len(y), -1)
    return logits.gather(2, y.expand(points.shape[0], -1)[..., None]) - logits


def bound_violations(bounds: torch.Tensor, model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float):
    """How many sampled margins fall below their claimed lower bound."""
    with torch.no_grad():
        true = margins_of(model, samples_in_ball(x, norm, eps, 200), y)
    return int((true < bounds.unsqueeze(0) - 1e-5).sum())


def all_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        lower, upper = x.sub(eps).clamp(0, 1), x.add(eps).clamp(0, 1)
        return {
            "ibp": margin_bounds(model, lower, upper, y),
            "crown-ibp": crown.crown_margins(model, x, y, norm, eps, "ibp"),
            "crown": crown.crown_margins(model, x, y, norm, eps, "crown"),
        }


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounds_contain_every_margin_in_the_ball(seed: int, norm: str) -> None:
    model = tiny_net(seed, inputs=4)
    torch.manual_seed(100 + seed)
    x = torch.rand(64, 4)
    y = model(x).argmax(1)
    for eps in (0.02, 0.1, 0.3):
        for name, bounds in all_margins(model, x, y, norm, eps).items():
            assert bound_violations(bounds, model, x, y, norm, eps) == 0, (name, eps)


def test_bounds_hold_on_the_harness_cnn_and_residual_net() -> None:
    torch.manual_seed(0)
    cnn = SmallCNN(1, 8, 10, width=4).eval()
    x = torch.rand(8, 1, 8, 8)
    y = cnn(x).argmax(1)
    for norm, eps in (("linf", 0.02), ("l2", 0.1)):
        for name, bounds in all_margins(cnn, x, y, norm, eps).items():
            assert bound_violations(bounds, cnn, x, y, norm, eps) == 0, name
    resnet = PreActResNet18(10, 1).eval()
    for module in resnet.modules():  # non-trivial eval statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    x = torch.rand(2, 1, 16, 16)
    y = resnet(x).argmax(1)
    with torch.no_grad():
        bounds = margin_bounds(resnet, (x - 1e-4).clamp(0, 1), (x + 1e-4).clamp(0, 1), y)
    assert bound_violations(bounds, resnet, x, y, "linf", 1e-4) == 0
    status = VERIFIERS.get("crown-v1").make()(resnet, x, y, "linf", 1e-4).status
    assert status is not None and "chain" in status


def dense_grid_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 81) -> torch.Tensor:
    """Robust on every point of a steps x steps grid over the Linf ball ∩ [0, 1] of a 2-D input."""
    t = torch.linspace(-1, 1, steps)
    grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).view(-1, 1, 2)
    points = (x.unsqueeze(0) + eps * grid).clamp(0, 1)
    with torch.no_grad():
        return (model(points.flatten(0, 1)).view(len(grid), len(x), -1).argmax(2) == y).all(0)


def pgd_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    attack = PGD(eps, norm=norm, steps=50, restarts=3, loss="margin")
    x_adv = attack(Victim(model, 3), x, y)
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_certified_examples_survive_dense_search_and_pgd(seed: int) -> None:
    model = tiny_net(seed)
    torch.manual_seed(200 + seed)
    x = 0.2 + 0.6 * torch.rand(100, 2)
    y = model(x).argmax(1)
    totals = {"ibp-v1": 0, "crown-v1": 0}
    for eps in (0.01, 0.05, 0.15):
        grid = dense_grid_robust(model, x, y, eps)
        attacked = pgd_robust(model, x, y, "linf", eps)
        found = {v: VERIFIERS.get(v).make()(model, x, y, "linf", eps).certified for v in ("ibp-v1", "crown-v1")}
        for name, certified in found.items():
            assert not (certified & ~grid).any(), (name, eps)
            assert not (certified & ~attacked).any(), (name, eps)
            assert int(certified.sum()) <= int((grid & attacked).sum()) <= int(attacked.sum())
            totals[name] += int(certified.sum())
        assert not (found["ibp-v1"] & ~found["crown-v1"]).any()
    assert totals["crown-v1"] > totals["ibp-v1"] > 0  # tighter somewhere, and not vacuous


def test_crown_certifies_at_least_what_ibp_does_on_the_harness_cnn() -> None:
    torch.manual_seed(3)
    cnn = SmallCNN(1, 8, 10, width=4).eval()
    x = torch.rand(32, 1, 8, 8)
    y = cnn(x).argmax(1)
    ibp = VERIFIERS.get("ibp-v1").make()(cnn, x, y, "linf", 0.002).certified
    tight = VERIFIERS.get("crown-ibp-v1").make()(cnn, x, y, "linf", 0.002).certified
    assert not (ibp & ~tight).any() and int(tight.sum()) >= int(ibp.sum())


def test_a_relaxation_with_a_flipped_sign_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mutation the containment test guards against: the ReLU's upper line with its intercept's
    sign flipped (it then lies below the ReLU), which makes the bounds unsound."""
    model = tiny_net(0, inputs=4)
    torch.manual_seed(100)
    x = torch.rand(64, 4)
    y = model(x).argmax(1)
    original = crown.ReLU.backward

    def flipped(self, a, bias, box):  # noqa: ANN001, ANN202
        out, new_bias = original(self, a, bias, box)
        return out, 2 * bias - new_bias  # the upper relaxation's shift, negated

    monkeypatch.setattr(crown.ReLU, "backward", flipped)
    bounds = crown.crown_margins(model, x, y, "linf", 0.3, "ibp")
    assert bound_violations(bounds, model, x, y, "linf", 0.3) > 0


def test_unsupported_modules_are_reported_not_guessed() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)).eval()
    x, y = torch.rand(5, 2), torch.zeros(5, dtype=torch.long)
    for verifier in ("ibp-v1", "crown-v1"):
        result = VERIFIERS.get(verifier).make()(model, x, y, "linf", 0.1)
        assert result.status is not None and "Tanh" in result.status and not result.certified.any()
    smoothing = VERIFIERS.get("smoothing-v1").make()(model, x, y, "l2", 0.1)
    assert "not a Gaussian-smoothed classifier" in str(smoothing.status)


def linear_smoothed(sigma: float) -> tuple[SmoothedClassifier, torch.Tensor]:
    """Two classes split by w·x + b = 0: the smoothed classifier's exact radius is the distance."""
    w, b = torch.tensor([3.0, -4.0]), 0.5
    base = nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(torch.stack([-w, w]) / 2)
        base.bias.copy_(torch.tensor([-b, b]) / 2)
    return SmoothedClassifier(base, sigma, 8), torch.cat([w, torch.tensor([b])])


def test_smoothing_radius_is_below_the_analytic_radius_and_near_it() -> None:
    torch.manual_seed(0)
    sigma = 0.25
    model, plane = linear_smoothed(sigma)
    x = torch.rand(64, 2) - 0.5
    distance = (x @ plane[:2] + plane[2]) / plane[:2].norm()
    truth = (distance > 0).long()
    guess, radius = certified_radius(model.base, x, sigma, 100, 20000, 0.001)
    decided = radius > 0
    assert (guess[decided] == truth[decided]).all()
    assert (radius <= distance.abs() + 1e-6).all()
    # p_A = Φ(d / σ) is known: where it is well inside (0.5, 1), the bound from 20,000 draws is close
    far = decided & (distance.abs() > 0.05) & (distance.abs() < 2.5 * sigma)
    assert far.sum() > 10 and (radius[far] >= distance.abs()[far] - 0.08 * sigma - 0.1 * distance.abs()[far]).all()
    # on the boundary itself CERTIFY abstains: not certified
    on_plane = torch.tensor([[0.1, (0.3 + 0.5) / 4]])
    assert abs(float(on_plane @ plane[:2] + plane[2])) < 1e-6
    assert float(certified_radius(model.base, on_plane, sigma, 100, 2000, 0.001)[1]) < 0


def test_smoothing_certifies_only_beyond_eps() -> None:
    torch.manual_seed(1)
    model, plane = linear_smoothed(0.25)
    x = torch.tensor([[0.5, -0.2]])  # distance (1.5 + 0.8 + 0.5) / 5 = 0.56
    y = torch.tensor([1])
    verifier = VERIFIERS.get("smoothing-v1").make(overrides={"n": 5000})
    assert verifier(model, x, y, "l2", 0.3).certified.all()
    assert not verifier(model, x, y, "l2", 0.6).certified.any()
    assert not verifier(model, x, 1 - y, "l2", 0.1).certified.any()
    assert math.isclose(float((x @ plane[:2] + plane[2]) / 5), 0.56, abs_tol=1e-6)
