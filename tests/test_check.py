"""`robustmatrix check`: a defense that behaves differently from what it declares is caught, with evidence."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from torch.autograd import grad as imported_grad

from attacks.base import Attack
from bench.commands.check import FAIL, PASS, WARN, check_attack, check_defense
from bench.foundation.registry import ATTACKS, DEFENSES
from bench.foundation.specs import AttackSpec, Budget, DefenseSpec
from defenses.standard import Standard
from tests.conftest import run_cli


class NoisyAtInference(Standard):
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 0.05 * torch.randn_like(x)).clamp(0, 1)


class OneBitInput(Standard):
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return (x > 0.5).float()


class ReturnsProbabilities(Standard):
    def deploy(self, model: nn.Module) -> nn.Module:
        return nn.Sequential(model.eval(), nn.Softmax(dim=1))


class HugeLogits(Standard):
    def deploy(self, model: nn.Module) -> nn.Module:
        class Scaled(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return 1000.0 * model(x)

        return Scaled()


class PurifiesAtInference(Standard):
    """One gradient step on the input inside forward: a 'dynamic' defense."""

    def deploy(self, model: nn.Module) -> nn.Module:
        class Purify(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                with torch.enable_grad():
                    probe = x.detach().requires_grad_(True)
                    (grad,) = torch.autograd.grad(model(probe).logsumexp(1).sum(), probe)
                return model((x + 0.01 * grad.sign()).clamp(0, 1))

        return Purify()


class PurifiesWithImportedGrad(Standard):
    """The same, through `from torch.autograd import grad` (a name bound before check patches anything)."""

    def deploy(self, model: nn.Module) -> nn.Module:
        class Purify(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                with torch.enable_grad():
                    probe = x.detach().requires_grad_(True)
                    (grad,) = imported_grad(model(probe).logsumexp(1).sum(), probe)
                return model((x + 0.01 * grad.sign()).clamp(0, 1))

        return Purify()


class PurifiesWithBackward(Standard):
    def deploy(self, model: nn.Module) -> nn.Module:
        class Purify(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                with torch.enable_grad():
                    probe = x.detach().requires_grad_(True)
                    model(probe).logsumexp(1).sum().backward()
                return model((x + 0.01 * probe.grad.sign()).clamp(0, 1))

        return Purify()


class FlatOnOne(Standard):
    """The input gradient vanishes on the brightest example of every batch, and only there: the
    flat loss surface one example of a noisy plugin can have."""

    FLAT = 1

    def deploy(self, model: nn.Module) -> nn.Module:
        inner, flat = super().deploy(model), self.FLAT

        class Flat(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = inner(x)
                keep = torch.ones(len(x), 1, dtype=torch.bool, device=x.device)
                keep[x.flatten(1).sum(1).topk(min(flat, len(x))).indices] = False
                return torch.where(keep, out, out.detach())

        return Flat().eval()


class FlatOnTen(FlatOnOne):
    FLAT = 10


class Unreproducible(Standard):
    def fit(self, model, data, ctx) -> None:
        generator = torch.Generator().manual_seed(time.time_ns() % 2**31)
        for parameter in model.parameters():
            parameter.data.add_(0.01 * torch.randn(parameter.shape, generator=generator))
        super().fit(model, data, ctx)


def _spec(factory, **declared) -> DefenseSpec:
    base = DEFENSES.get("standard-v1")
    return DefenseSpec(id="probe-v1", factory=factory, kwargs=dict(base.kwargs), **declared)


def _status(findings, check: str) -> tuple[str, str]:
    (finding,) = [f for f in findings if f.check == check]
    return finding.status, finding.evidence


@pytest.fixture(scope="module")
def cpu():
    return torch.device("cpu")


def test_a_well_behaved_defense_passes_everything(digits, cpu):
    findings = check_defense(DEFENSES.get("standard-v1"), digits, cpu)
    assert {f.status for f in findings} == {PASS}, findings
    assert len(findings) == 10


@pytest.mark.parametrize(
    "factory, declared, check, status, evidence",
    [
        (NoisyAtInference, {}, "deterministic unless declared randomized", FAIL, "does not declare randomized=True"),
        (NoisyAtInference, {"randomized": True}, "deterministic unless declared randomized", PASS, "declared"),
        (OneBitInput, {}, "input gradients are non-zero", FAIL, "declare differentiable=False"),
        (
            OneBitInput,
            {"differentiable": False, "bpda_approximation": "identity"},
            "input gradients are non-zero",
            PASS,
            "BPDA works",
        ),
        (ReturnsProbabilities, {}, "outputs are logits", FAIL, "probabilities, not logits"),
        (HugeLogits, {}, "input gradients are non-zero", FAIL, "declare saturates_softmax=True"),
        (HugeLogits, {"saturates_softmax": True}, "input gradients are non-zero", WARN, "declared saturates_softmax"),
        (PurifiesAtInference, {}, "no gradients inside forward", FAIL, "torch.autograd.grad"),
        (PurifiesWithImportedGrad, {}, "no gradients inside forward", FAIL, "torch.autograd.grad"),
        (PurifiesWithBackward, {}, "no gradients inside forward", FAIL, "backward"),
        (Unreproducible, {}, "training is reproducible", FAIL, "differ by up to"),
    ],
)
def test_undeclared_behaviour_is_caught_with_evidence(digits, cpu, factory, declared, check, status, evidence):
    findings = check_defense(_spec(factory, **declared), digits, cpu)
    found_status, found_evidence = _status(findings, check)
    assert found_status == status, found_evidence
    assert evidence in found_evidence


class LeavesTheBall(Attack):
    def __init__(self, eps: float) -> None:
        super().__init__(eps)

    def generate(self, victim, x, y):
        return (x + 2 * self.eps * torch.randn_like(x).sign()).clamp(0, 1)

    def max_passes_per_example(self):
        return 0, 0


class OverBudget(Attack):
    def __init__(self, eps: float) -> None:
        super().__init__(eps)

    def generate(self, victim, x, y):
        for _ in range(3):
            victim.model(x)
        return x.clone()

    def max_passes_per_example(self):
        return 1, 0


def test_attack_checks(digits, cpu):
    good = check_attack(ATTACKS.get("pgd-linf-v1"), digits, cpu)
    assert {f.status for f in good} == {PASS}
    outside = check_attack(AttackSpec(id="out-v1", factory=LeavesTheBall, family="noise", norm="linf"), digits, cpu)
    assert outside[-1].status == FAIL and "left the linf ball" in outside[-1].evidence
    over = check_attack(AttackSpec(id="over-v1", factory=OverBudget, family="noise", norm="linf"), digits, cpu)
    assert _status(over[:5], "budget respected")[0] == FAIL
    assert "3.0 forwards" in _status(over[:5], "budget respected")[1]


def plain_sign_noise(eps: float):
    """A plugin attack that is only a callable (victim, x, y) -> x_adv, as the harness allows."""

    def attack(victim, x, y):
        return (x + eps * torch.randn_like(x).sign()).clamp(0, 1)

    return attack


def test_a_plain_callable_attack_is_checked_and_warned_about_its_budget(digits, cpu):
    spec = AttackSpec(id="plain-v1", factory=plain_sign_noise, family="noise", norm="linf")
    findings = check_attack(spec, digits, cpu)
    budget = [f for f in findings if f.check == "budget respected"]
    assert budget and {f.status for f in budget} == {WARN}, budget
    assert "declares no budget" in budget[0].evidence and "0.0 forwards" in budget[0].evidence
    assert _status(findings[:5], "inside the threat model")[0] == PASS
    assert FAIL not in {f.status for f in findings}, findings


def test_a_non_lp_attack_is_checked_at_real_radii(digits, cpu):
    findings = check_attack(ATTACKS.get("spatial-v1"), digits, cpu)
    assert {f.status for f in findings} == {PASS}, findings
    assert {f.evidence.split(":")[0] for f in findings if f.check == "inside the threat model"} == {"eps 10", "eps 30"}


def test_check_cli_exit_codes_and_unknown_ids():
    ok = run_cli("check", "standard-v1", "--device", "cpu")
    assert ok.code == 0 and "passed: 0 failure(s)" in ok.stdout
    DEFENSES.register(_spec(OneBitInput))
    try:
        bad = run_cli("check", "probe-v1", "--device", "cpu")
    finally:
        DEFENSES.unregister("probe-v1")
    assert bad.code == 1 and "FAILED: 1 failure(s)" in bad.stdout and "FAIL  input gradients" in bad.stdout
    unknown = run_cli("check", "standart-v1")
    assert unknown.code == 2 and "did you mean standard-v1" in unknown.stderr


def test_check_json_output():
    import json

    result = run_cli("check", "standard-v1", "--device", "cpu", "--json")
    findings = json.loads(result.stdout)
    assert {"status", "check", "evidence"} <= set(findings[0])


def test_training_cost_includes_adversarial_crafting(digits, cpu):
    """Passes spent in fit crafting adversarial examples are counted and reported as evidence."""
    findings = check_defense(DEFENSES.get("pgd-at-linf-v1"), digits, cpu)
    status, evidence = _status(findings, "builds and trains")
    assert status == PASS
    forwards = int(evidence.split(" forward")[0])
    assert forwards > 320 * 20 * 7, "adversarial crafting passes must be counted"


def test_a_plugin_whose_declared_defaults_contradict_its_constructor_is_warned(digits, cpu):
    spec = AttackSpec(
        id="drifted-fgsm-v1",
        factory="attacks.fgsm:FGSM",
        family="gradient",
        norm="linf",
        kwargs={"loss": "margin"},
        budget_defaults=Budget(steps=1, restarts=1),
    )
    status, evidence = _status(check_attack(spec, digits, cpu), "one source of defaults")
    assert status == WARN and "loss='margin'" in evidence and "'ce'" in evidence


@pytest.mark.parametrize("factory, status, flagged", [(FlatOnOne, PASS, False), (FlatOnTen, FAIL, True)])
def test_check_and_the_leaderboard_agree_on_vanishing_gradients(digits, cpu, tmp_path, factory, status, flagged):
    """One rule for both: a single flat example of 64 neither fails `check` nor raises the
    leaderboard's zero-gradients flag; ten (over 10%, at least 3) do both."""
    from leaderboard.report import build_report
    from tests.leaderboard_data import FakeDefense, write_database

    found_status, evidence = _status(check_defense(_spec(factory), digits, cpu), "input gradients are non-zero")
    assert found_status == status, evidence
    assert f"on {factory.FLAT} of " in evidence
    share = factory.FLAT / 64
    observed = {"vanishing_gradient_ce": share, "vanishing_gradient_dlr": share, "zero_gradient_dlr": share}
    db = write_database(tmp_path / "r.db", [FakeDefense("d-v1", {("pgd-linf-v1", 0.2): 0.0}, observed=observed)])
    (entry,) = build_report(db)["datasets"][0]["defenses"]
    assert ("zero-gradients" in {f["key"] for f in entry["flags"]}) is flagged
