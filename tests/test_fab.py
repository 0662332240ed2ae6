"""FAB and FAB-T: exact boundary projections, as strong as the reference implementation on the same
model and examples, inside the declared budget, reproducible."""

from __future__ import annotations

import pytest
import torch

from attacks.base import Victim, perturbation_norm, predict
from attacks.fab import boundary_projection
from bench.foundation.counting import CountingModel, PassCounter
from bench.foundation.keys import seed_everything
from bench.foundation.registry import ATTACKS
from tests.shared_models import robust_digits

REFERENCE_NORMS = {"linf": "Linf", "l2": "L2"}


def _problems(n: int = 64, d: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    points = torch.rand(n, d, generator=generator)
    w = torch.randn(n, d, generator=generator) * (torch.rand(n, d, generator=generator) > 0.2)  # some zeros
    c = torch.randn(n, generator=generator) * 0.5
    return points, w, c


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_projection_meets_the_hyperplane_inside_the_box(norm):
    points, w, c = _problems()
    delta = boundary_projection(points, w, c, norm)
    moved = points + delta
    feasible = (torch.where(w * c[:, None] > 0, 1 - points, points) * w.abs()).sum(dim=1) >= c.abs()
    assert ((w * delta).sum(dim=1) - c)[feasible].abs().max() < 1e-5
    assert moved.min() >= 0 and moved.max() <= 1


def test_the_projection_is_the_smallest_move_by_hand():
    # w = (1, 2), c = 1, from the centre: Linf puts t on both (t + 2t = 1, t = 1/3); L2 moves along
    # w, delta = w / |w|^2 = (0.2, 0.4). With the second coordinate's room cut to 0.1, Linf needs
    # 0.8 on the first (0.8 + 0.2 = 1) and L2 saturates the second at 0.1, then 0.8 on the first.
    w, c = torch.tensor([[1.0, 2.0]]), torch.tensor([1.0])
    centre = torch.tensor([[0.0, 0.5]])
    assert boundary_projection(centre, w, c, "linf")[0].tolist() == pytest.approx([1 / 3, 1 / 3])
    assert boundary_projection(centre, w, c, "l2")[0].tolist() == pytest.approx([0.2, 0.4])
    near_edge = torch.tensor([[0.0, 0.9]])
    assert boundary_projection(near_edge, w, c, "linf")[0].tolist() == pytest.approx([0.8, 0.1])
    assert boundary_projection(near_edge, w, c, "l2")[0].tolist() == pytest.approx([0.8, 0.1])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_projection_is_as_small_as_the_references(norm):
    projections = pytest.importorskip("autoattack.fab_projections", reason="the reference autoattack is not installed")
    points, w, c = _problems(seed=1)
    ours = boundary_projection(points, w, c, norm)
    reference = getattr(projections, f"projection_{norm}")(points, w, c + (w * points).sum(dim=1))
    feasible = (torch.where(w * c[:, None] > 0, 1 - points, points) * w.abs()).sum(dim=1) >= c.abs()
    ours_size, reference_size = perturbation_norm(ours, norm)[feasible], perturbation_norm(reference, norm)[feasible]
    assert torch.allclose(ours_size, reference_size, atol=1e-4), (ours_size - reference_size).abs().max()


@pytest.fixture(scope="module")
def robust_batch():
    from bench.foundation.data import load_dataset

    trained = robust_digits()
    data = load_dataset("digits")
    index = data.eval_indices(250)[:120]
    x, y = data.x_test[index], data.y_test[index]
    correct = predict(trained.deployed, x) == y
    return trained.deployed, x[correct], y[correct]


@pytest.mark.parametrize(
    "attack_id, eps, targeted",
    [
        ("fab-linf-v1", 0.2, False),
        ("fab-t-linf-v1", 0.2, True),
        ("fab-l2-v1", 1.0, False),
        ("fab-t-l2-v1", 1.0, True),
    ],
)
def test_fab_is_as_strong_as_the_reference_on_the_same_model(robust_batch, attack_id, eps, targeted):
    fab_pt = pytest.importorskip("autoattack.fab_pt", reason="the reference autoattack is not installed")
    model, x, y = robust_batch
    spec = ATTACKS.get(attack_id)
    seed_everything(0)
    ours = spec.make("digits", {"steps": 30}, eps=eps)(Victim(model, 10), x, y)
    reference = fab_pt.FABAttack_PT(
        model, n_restarts=1, n_iter=30, eps=eps, seed=0, norm=REFERENCE_NORMS[spec.norm], verbose=False,
        device="cpu", n_target_classes=9,
    )  # fmt: skip
    reference.targeted = targeted
    theirs = reference.perturb(x, y)
    ours_robust = (predict(model, ours) == y).float().mean().item()
    theirs_robust = (predict(model, theirs) == y).float().mean().item()
    assert ours_robust <= theirs_robust + 0.02, (ours_robust, theirs_robust)
    assert ours_robust < 0.9, "the attack must break a sizeable share, or this test shows nothing"


@pytest.mark.parametrize("attack_id", ["fab-linf-v1", "fab-t-l2-v1"])
def test_fab_stays_in_its_declared_budget_and_is_reproducible(robust_batch, attack_id):
    model, x, y = robust_batch
    spec = ATTACKS.get(attack_id)
    results = []
    for _ in range(2):
        counter = PassCounter()
        attack = spec.make("digits", {"steps": 8, "restarts": 2}, eps=0.3 if spec.norm == "linf" else 1.5)
        seed_everything(3)
        minimal = attack.minimal(Victim(CountingModel(model, counter), 10), x, y)
        forwards, backwards = attack.max_passes_per_example()
        assert counter.forwards <= forwards * len(x) and counter.backwards <= backwards * len(x)
        assert minimal.shape == x.shape and minimal.min() >= 0 and minimal.max() <= 1
        results.append(minimal)
    assert torch.equal(results[0], results[1]), "same seed, same points"
    found = predict(model, results[0]) != y
    assert found.float().mean() > 0.5, "a minimum-norm attack finds some adversarial point for most examples"
