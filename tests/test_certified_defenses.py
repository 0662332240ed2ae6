"""The certified-training defenses: opt-in (the default matrix's defenses, attacks and keys are those
of the build before them), IBP training raises the certified accuracy that ``ibp-v1`` proves, and
the smoothing defense deploys a randomized majority vote that ``smoothing-v1`` certifies."""

from __future__ import annotations

import torch

from bench.foundation.config import preset
from bench.foundation.data import load_dataset
from bench.foundation.models import build_model
from bench.foundation.plugins import load_builtins
from bench.foundation.registry import ATTACKS, DEFENSES, VERIFIERS
from defenses.base import TrainContext, TrainData
from verifiers.smoothing import SmoothedClassifier

torch.set_num_threads(1)

DEFAULT_DEFENSES = [
    "art-jpeg-v1", "art-spatial-smoothing-v1", "bit-depth-v1", "distillation-v1", "fast-at-linf-v1",
    "fgsm-at-linf-v1", "mart-linf-v1", "multi-at-avg-v1", "multi-at-max-v1", "pgd-at-l2-v1", "pgd-at-linf-v1",
    "random-resize-pad-v1", "standard-v1", "trades-linf-v1",
]  # fmt: skip
"""The default matrix's defenses before certified training existed (``git show 1d6883b``)."""


def test_the_default_matrix_selects_no_opt_in_component() -> None:
    load_builtins()
    spec = preset("default")
    assert [d.id for d in DEFENSES.select(list(spec.defenses))] == DEFAULT_DEFENSES
    attacks = [a.id for a in ATTACKS.select(list(spec.attacks))]
    assert len(attacks) == 38 and not any(a.startswith("autoattack") for a in attacks)
    assert not spec.verifiers
    for opt_in in ("ibp-linf-v1", "smoothing-l2-v1"):
        assert DEFENSES.get(opt_in).opt_in
        assert [d.id for d in DEFENSES.select([opt_in])] == [opt_in]  # a literal id selects it


def _digits(n: int = 2000) -> tuple[TrainData, torch.Tensor, torch.Tensor]:
    data = load_dataset("digits")
    train = TrainData(data.x_train[:n], data.y_train[:n], data.num_classes, data.name)
    return train, data.x_test[:100], data.y_test[:100]


def _trained(defense_id: str, **overrides: object) -> tuple[torch.nn.Module, object]:
    load_builtins()
    train, _, _ = _digits()
    defense = DEFENSES.get(defense_id).make("digits", overrides)
    torch.manual_seed(0)
    model = build_model("digits", (1, 8, 8), 10)
    defense.fit(model, train, TrainContext(torch.device("cpu"), 0))
    return model, defense


def test_ibp_training_raises_the_certified_accuracy() -> None:
    _, x, y = _digits()
    certify = VERIFIERS.get("ibp-v1").make()
    fractions = {}
    for defense_id, overrides in (
        ("standard-v1", {"epochs": 8}),
        ("ibp-linf-v1", {"epochs": 8, "eps": 0.1, "warmup": 0.25, "ramp": 0.5}),
    ):
        model, defense = _trained(defense_id, **overrides)
        deployed = defense.deploy(model)
        correct = deployed(x).argmax(1) == y
        fractions[defense_id] = float(
            (certify(deployed.classifier, x, y, "linf", 0.05).certified & correct).float().mean()
        )
    assert fractions["ibp-linf-v1"] > fractions["standard-v1"] + 0.1, fractions


def test_smoothing_deploys_a_randomized_vote_that_smoothing_certifies() -> None:
    model, defense = _trained("smoothing-l2-v1", epochs=3)
    deployed = defense.deploy(model)
    assert isinstance(deployed, SmoothedClassifier) and DEFENSES.get("smoothing-l2-v1").randomized
    _, x, y = _digits()
    torch.manual_seed(0)
    first, second = deployed(x), deployed(x)
    assert not torch.equal(first, second)  # a fresh vote per pass
    certified = VERIFIERS.get("smoothing-v1").make(overrides={"n": 200})(deployed, x, y, "l2", 0.25)
    assert certified.ran and 0 < int(certified.certified.sum()) < len(y)


def test_crown_ibp_training_steps_through_the_mixed_bound() -> None:
    load_builtins()
    train, _, _ = _digits(128)
    defense = DEFENSES.get("ibp-linf-v1").make("digits", {"epochs": 1, "warmup": 0.0, "ramp": 1.0, "crown_weight": 1.0})
    torch.manual_seed(0)
    model = build_model("digits", (1, 8, 8), 10)
    before = [p.detach().clone() for p in model.parameters()]
    defense.fit(model, train, TrainContext(torch.device("cpu"), 0))
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
