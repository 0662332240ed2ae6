"""Guarantees every registered defense keeps, parametrized over the registry (a new defense is tested
the moment it is registered), and the bookkeeping users rely on: training cost counted in full,
progress per epoch, honest declarations in ``robustmatrix list --json``."""

from __future__ import annotations

import json

import pytest
import torch

from bench.execution.jobs import TrainingJob
from bench.execution.workbench import Workbench
from bench.foundation.errors import RobustMatrixError
from bench.foundation.keys import digest, seed_everything
from bench.foundation.models import build_model
from bench.foundation.registry import DEFENSES
from defenses.base import TrainContext, TrainData
from defenses.input_transform import through_numpy
from tests.conftest import run_cli

ALL_DEFENSES = DEFENSES.ids()
N_TRAIN = 1347  # the digits training split


def _job(defense_id: str, **overrides) -> TrainingJob:
    kwargs = DEFENSES.get(defense_id).resolve_kwargs("digits", {"epochs": 1, **overrides})
    return TrainingJob(digest({"test": defense_id, **kwargs}), defense_id, kwargs, "digits", 0, f"{defense_id}.pt")


@pytest.fixture(scope="module")
def workbench(tmp_path_factory) -> Workbench:
    return Workbench("digits", torch.device("cpu"), tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def trained(workbench):
    """Every defense trained for one epoch through the real workbench path (checkpoint on disk)."""
    return {defense_id: workbench.train(_job(defense_id)) for defense_id in ALL_DEFENSES}


# Passes per training example and epoch, from each method's definition: crafting the adversarial
# examples (and a teacher's soft labels) is part of the cost. PGD's last iterate costs one forward
# to check success; TRADES needs one clean forward for its KL target. One explicit entry per defense:
# a new defense has no expectation until someone writes down what it should cost.
_PASSES = {
    "standard-v1": lambda steps: (1, 1),
    "pgd-at-linf-v1": lambda steps: (steps + 2, steps + 1),
    "pgd-at-l2-v1": lambda steps: (steps + 2, steps + 1),
    "fgsm-at-linf-v1": lambda steps: (2, 2),
    "fast-at-linf-v1": lambda steps: (2, 2),
    "trades-linf-v1": lambda steps: (steps + 3, steps + 2),
    "mart-linf-v1": lambda steps: (steps + 3, steps + 2),
    "multi-at-max-v1": lambda steps: (2 * (steps + 1) + 2, 2 * steps + 2),
    "multi-at-avg-v1": lambda steps: (2 * (steps + 1) + 2, 2 * steps + 2),
    # teacher epoch (1 forward, 1 backward) + student epoch (teacher + student forward, student backward)
    "distillation-v1": lambda steps: (1 + 2, 1 + 1),
    # input transformations: the classifier trained on (pre-transformed) inputs
    "bit-depth-v1": lambda steps: (1, 1),
    "random-resize-pad-v1": lambda steps: (1, 1),
    "art-jpeg-v1": lambda steps: (1, 1),
    "art-spatial-smoothing-v1": lambda steps: (1, 1),
    # Gaussian-noise training: one noisy copy per example
    "smoothing-l2-v1": lambda steps: (1, 1),
    # IBP training: the clean pass, plus the bound's centre and radius passes once eps ramps up
    # (a one-epoch run ramps within its only epoch)
    "ibp-linf-v1": lambda steps: (3, 1),
}


def _expected_passes(defense_id: str, kwargs: dict) -> tuple[int, int]:
    return _PASSES[defense_id](kwargs.get("steps", 0))


def test_every_builtin_defense_has_a_cost_expectation():
    builtins = {d for d in ALL_DEFENSES if DEFENSES.get(d).source == "builtin"}
    missing = sorted(builtins - set(_PASSES))
    assert not missing, f"add the passes per example and epoch of {missing} to _PASSES"
    assert not set(_PASSES) - builtins, "an expectation for a defense that is not registered"


@pytest.mark.parametrize("defense_id", ALL_DEFENSES)
def test_training_cost_counts_every_pass(defense_id, trained):
    record = trained[defense_id]
    forwards, backwards = _expected_passes(defense_id, record.kwargs)
    assert (record.forwards, record.backwards) == (forwards * N_TRAIN, backwards * N_TRAIN)
    # the epochs actually run: a distilled student's record includes its teacher's
    assert record.wall_time > 0 and record.epochs == (2 if defense_id == "distillation-v1" else 1)


@pytest.mark.parametrize("defense_id", ALL_DEFENSES)
def test_deployed_defense_gives_finite_logits_and_is_deterministic_unless_randomized(
    defense_id, trained, workbench, eval_batch
):
    spec = DEFENSES.get(defense_id)
    loaded = workbench.load(_job(defense_id))
    x = eval_batch[0][:64]
    with torch.no_grad():
        first, second = loaded.deployed(x), loaded.deployed(x)
    assert first.shape == (64, 10) and torch.isfinite(first).all()
    if spec.randomized:
        assert not torch.equal(first, second), f"{defense_id} declares randomized but its outputs repeat"
        with torch.no_grad():
            seed_everything(3)
            again = loaded.deployed(x)
            seed_everything(3)
            assert torch.equal(again, loaded.deployed(x)), "randomness must come from torch's seeded global RNG"
    else:
        assert torch.equal(first, second), f"{defense_id} is not declared randomized but its outputs vary"


@pytest.mark.parametrize("defense_id", ALL_DEFENSES)
def test_checkpoint_round_trips_through_weights_only_load(defense_id, trained, workbench, eval_batch):
    job = _job(defense_id)
    payload = torch.load(workbench.checkpoint_dir / job.checkpoint, map_location="cpu", weights_only=True)
    assert payload["meta"]["forwards"] == trained[defense_id].forwards
    spec = DEFENSES.get(defense_id)
    defense = spec.make("digits", job.kwargs)
    fresh = workbench._fresh_model(defense)
    fresh.load_state_dict(payload["state_dict"])
    x = eval_batch[0][:32]
    original_model = workbench.load(job).deployed
    with torch.no_grad():
        seed_everything(5)
        reloaded = defense.deploy(fresh)(x)
        seed_everything(5)
        original = original_model(x)
    assert torch.equal(reloaded, original)


@pytest.mark.parametrize("defense_id", [d for d in ALL_DEFENSES if not DEFENSES.get(d).differentiable])
def test_non_differentiable_defenses_have_zero_gradients_and_a_working_bpda(defense_id, trained, workbench, eval_batch):
    """What BPDA exists for: the deployed defense's input gradient is exactly zero, while the declared
    identity approximation passes the classifier's gradient through."""
    loaded = workbench.load(_job(defense_id))
    x = eval_batch[0][:16].clone().requires_grad_(True)
    y = eval_batch[1][:16]
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(loaded.deployed(x), y), x)
    assert torch.count_nonzero(grad) == 0
    assert loaded.approximation is not None
    (bpda_grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(loaded.approximation(x), y), x)
    assert torch.count_nonzero(bpda_grad) > 0
    with torch.no_grad():
        # x + (preprocess(x) - x) equals preprocess(x) up to float rounding
        assert torch.allclose(loaded.approximation(x), loaded.deployed(x), atol=1e-5), "BPDA changed the forward pass"


def test_numpy_transform_keeps_device_dtype_and_a_zero_gradient():
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    out = through_numpy(lambda a: a[:, :, ::-1, :].copy(), x)
    assert out.dtype == x.dtype and out.device == x.device
    assert torch.equal(out.detach(), x.detach().flip(2))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize(
    "defense_id, overrides, expected",
    [
        ("pgd-at-linf-v1", {"epochs": 2}, [1, 2]),
        ("distillation-v1", {"epochs": 2, "teacher_epochs": 3}, [1, 2, 3, 4, 5]),
    ],
)
def test_progress_is_reported_per_epoch_and_distillation_counts_teacher_epochs(digits, defense_id, overrides, expected):
    data = TrainData(digits.x_train[:128], digits.y_train[:128], 10, "digits")
    seen = []
    ctx = TrainContext(torch.device("cpu"), 0, on_epoch=lambda epoch, total, loss: seen.append((epoch, total)))
    DEFENSES.get(defense_id).make("digits", overrides).fit(build_model("digits", (1, 8, 8), 10), data, ctx)
    assert seen == [(epoch, expected[-1]) for epoch in expected]


@pytest.mark.parametrize(
    "defense_id, overrides, fragment",
    [
        ("bit-depth-v1", {"bits": 0}, "bits must be an integer from 1 to 16"),
        ("art-jpeg-v1", {"quality": 0}, "quality must be an integer from 1 to 95"),
        ("random-resize-pad-v1", {"min_scale": 1.5}, "min_scale must be in (0, 1]"),
        ("art-spatial-smoothing-v1", {"window_size": 0}, "window_size must be an integer >= 1"),
        ("multi-at-max-v1", {"strategy": "sum"}, "strategy must be one of max, avg"),
        ("distillation-v1", {"temperature": 0}, "temperature must be > 0"),
        ("trades-linf-v1", {"steps": 0}, "steps must be an integer >= 1"),
        ("pgd-at-l2-v1", {"eps": "1.5"}, "eps must be a number > 0"),
        ("mart-linf-v1", {"beta": -1}, "beta must be >= 0"),
        ("fgsm-at-linf-v1", {"optimizer": "adamw"}, "optimizer must be one of adam, sgd"),
        ("standard-v1", {"epochs": 0}, "epochs must be an integer >= 1"),
    ],
)
def test_bad_defense_kwargs_are_one_line_errors(defense_id, overrides, fragment):
    with pytest.raises(RobustMatrixError) as info:
        DEFENSES.get(defense_id).make("digits", overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_list_json_shows_every_defense_with_trained_against_and_nature():
    result = run_cli("list", "--kind", "defense", "--json")
    assert result.code == 0
    entries = {e["id"]: e for e in json.loads(result.stdout)}
    assert set(entries) == set(ALL_DEFENSES)
    for entry in entries.values():
        assert isinstance(entry["trained_against"], list)
        for key in ("randomized", "differentiable", "bpda_approximation", "outputs_logits", "saturates_softmax"):
            assert key in entry, f"{entry['id']} lacks {key}"

    def threats(defense_id):
        return sorted((t["norm"], t["eps"], t["attack"]) for t in entries[defense_id]["trained_against"])

    assert threats("pgd-at-l2-v1") == [("l2", 1.5, "pgd")]
    assert threats("fgsm-at-linf-v1") == [("linf", 0.2, "fgsm")]
    assert threats("fast-at-linf-v1") == [("linf", 0.2, "fgsm-rs")]
    assert threats("trades-linf-v1") == [("linf", 0.2, "pgd-kl")]
    assert threats("mart-linf-v1") == [("linf", 0.2, "pgd")]
    for strategy in ("max", "avg"):
        assert threats(f"multi-at-{strategy}-v1") == [("l2", 1.5, "pgd"), ("linf", 0.2, "pgd")]
        assert entries[f"multi-at-{strategy}-v1"]["kwargs"]["strategy"] == strategy
    for unprotected in ("distillation-v1", "bit-depth-v1", "random-resize-pad-v1", "art-jpeg-v1", "standard-v1"):
        assert threats(unprotected) == []
    assert entries["distillation-v1"]["saturates_softmax"] is True
    assert entries["distillation-v1"]["kwargs"]["temperature"] == 100.0
    assert entries["random-resize-pad-v1"]["randomized"] is True
    for masked in ("bit-depth-v1", "art-jpeg-v1", "art-spatial-smoothing-v1"):
        assert entries[masked]["differentiable"] is False and entries[masked]["bpda_approximation"] == "identity"
    assert entries["smoothing-l2-v1"]["randomized"] is True  # a Monte-Carlo vote
    honest = [d for d in ALL_DEFENSES if d not in ("distillation-v1", "random-resize-pad-v1", "smoothing-l2-v1")]
    for defense_id in honest:
        assert entries[defense_id]["randomized"] is False and entries[defense_id]["saturates_softmax"] is False


@pytest.mark.parametrize(
    "defense_id, attack",
    [
        ("pgd-at-linf-v1", "pgd"),
        ("pgd-at-l2-v1", "pgd"),
        ("trades-linf-v1", "pgd-kl"),
        ("mart-linf-v1", "pgd"),
        ("fgsm-at-linf-v1", "fgsm"),
        ("fast-at-linf-v1", "fgsm-rs"),
    ],
)
@pytest.mark.parametrize("norm, eps", [("l2", 1.5), ("linf", 0.1)])
def test_declared_trained_against_follows_a_norm_override(defense_id, attack, norm, eps):
    """The leaderboard's seen cells come from this declaration: a defense trained with
    ``{"norm": "l2"}`` was trained against L2, whatever its id says."""
    spec = DEFENSES.get(defense_id)
    kwargs = spec.resolve_kwargs("digits", {"norm": norm, "eps": eps})
    assert [vars(t) for t in spec.threat_models(kwargs)] == [{"norm": norm, "eps": eps, "attack": attack}]
    spec.make("digits", {"norm": norm, "eps": eps})  # and the defense itself takes that norm


@pytest.mark.parametrize("defense_id", ["pgd-at-linf-v1", "trades-linf-v1", "mart-linf-v1", "fgsm-at-linf-v1"])
def test_an_unsupported_norm_override_is_rejected_by_declaration_and_defense(defense_id):
    spec = DEFENSES.get(defense_id)
    with pytest.raises(RobustMatrixError, match="must be one of linf, l2, got 'l1'"):
        spec.threat_models(spec.resolve_kwargs("digits", {"norm": "l1"}))
    with pytest.raises(RobustMatrixError, match="norm must be linf or l2"):
        spec.make("digits", {"norm": "l1"})


def test_training_record_stores_the_overridden_norm(tmp_path):
    """End to end through the workbench: the training record stores the overridden norm."""
    workbench = Workbench("digits", torch.device("cpu"), tmp_path)
    record = workbench.train(_job("fgsm-at-linf-v1", norm="l2", eps=1.5))
    assert record.trained_against == [{"norm": "l2", "eps": 1.5, "attack": "fgsm"}]


def test_list_json_resolves_trained_against_per_dataset():
    entries = {e["id"]: e for e in json.loads(run_cli("list", "--json", "--dataset", "mnist", "multi-at-*").stdout)}
    assert sorted((t["norm"], t["eps"]) for t in entries["multi-at-max-v1"]["trained_against"]) == [
        ("l2", 2.0),
        ("linf", 0.3),
    ]
