"""``robustmatrix check ID``: sanity checks a defense or attack must pass before it enters the matrix.

Each check returns a finding — pass, warn or fail — with the evidence behind it, so a researcher
learns *why* (the numbers), not just *that*. A defense that behaves in ways it does not declare
(randomized, masking gradients, returning probabilities) fails here, before it can look robust on
the leaderboard.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attacks.base import Victim, perturbation_norm, predict
from bench.execution.probes import PROBE_EXAMPLES, VANISHING_GRADIENT, observe
from bench.foundation.counting import CountingModel, PassCounter
from bench.foundation.data import Dataset
from bench.foundation.gradients import (
    ZERO_GRADIENT_MIN_COUNT,
    ZERO_GRADIENT_MIN_FRACTION,
    gradients_vanish,
    vanished_count,
)
from bench.foundation.keys import seed_everything
from bench.foundation.kwargs import kwargs_drift
from bench.foundation.models import build_model
from bench.foundation.specs import NORMS, AttackSpec, DefenseSpec
from defenses.base import Defense, StraightThrough, TrainContext, TrainData

PASS, WARN, FAIL = "pass", "warn", "fail"
CHECK_TRAIN_EXAMPLES = 320
"""Size of the training slice ``check`` trains on: enough to learn something, small enough for seconds."""
CHECK_EVAL_EXAMPLES = 64
LP_NORMS = ("linf", "l2", "l1")
NO_BUDGET = (-1, -1)
"""Sentinel bound of a plain-callable attack, which has no ``max_passes_per_example`` to declare one."""
CHECK_EPS = {"linf": (0.1, 0.3), "l2": (0.5, 1.5), "l1": (2.0, 6.0), "spatial": (10.0, 30.0)}
"""Radii an attack plugin is checked at when it declares no eps grid of its own (spatial: degrees)."""


@dataclass(frozen=True)
class Finding:
    status: str
    check: str
    evidence: str


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].numel()), default=0.0)


class _RecordingEngine:
    """Stands in for autograd's execution engine: records every backward run, then delegates."""

    def __init__(self, engine: Any, calls: list[str]) -> None:
        self._engine = engine
        self._calls = calls

    def run_backward(self, *args: Any, **kwargs: Any) -> Any:
        # torch.autograd.grad runs the engine without accumulating into .grad; backward accumulates.
        self._calls.append("backward" if kwargs.get("accumulate_grad", True) else "torch.autograd.grad")
        return self._engine.run_backward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@contextmanager
def _gradient_calls() -> Iterator[list[str]]:
    """Record calls of autograd during a block: a forward pass that computes gradients is
    optimising at inference time (a dynamic defense), which standard attacks do not model.

    Hooked where every gradient computation meets — autograd's execution engine — so that
    ``from torch.autograd import grad``, ``Tensor.backward``, ``torch.autograd.functional`` and
    ``torch.func`` are all seen. Older or newer torch without that seam: the engine's Python entry
    point ``_engine_run_backward``; failing that, the public ``torch.autograd.grad``/``backward``."""
    calls: list[str] = []
    variable = getattr(getattr(torch.autograd, "variable", None), "Variable", None)
    engine = getattr(variable, "_execution_engine", None)
    if engine is not None and hasattr(engine, "run_backward"):
        variable._execution_engine = _RecordingEngine(engine, calls)
        try:
            yield calls
        finally:
            variable._execution_engine = engine
        return
    modules = [m for m in (torch.autograd, getattr(torch.autograd, "graph", None)) if m is not None]
    entry = getattr(torch.autograd, "_engine_run_backward", None)
    if entry is not None:

        def run_backward(*args: Any, **kwargs: Any) -> Any:
            calls.append("backward" if kwargs.get("accumulate_grad", True) else "torch.autograd.grad")
            return entry(*args, **kwargs)

        patched = [m for m in modules if getattr(m, "_engine_run_backward", None) is entry]
        for module in patched:
            module._engine_run_backward = run_backward
        try:
            yield calls
        finally:
            for module in patched:
                module._engine_run_backward = entry
        return
    original_grad, original_backward = torch.autograd.grad, torch.autograd.backward

    def grad(*args: Any, **kwargs: Any) -> Any:
        calls.append("torch.autograd.grad")
        return original_grad(*args, **kwargs)

    def backward(*args: Any, **kwargs: Any) -> Any:
        calls.append("backward")
        return original_backward(*args, **kwargs)

    torch.autograd.grad, torch.autograd.backward = grad, backward
    try:
        yield calls
    finally:
        torch.autograd.grad, torch.autograd.backward = original_grad, original_backward


def train_on_slice(
    spec: DefenseSpec, data: Dataset, device: torch.device, seed: int
) -> tuple[Defense, nn.Module, PassCounter]:
    """Train a defense with its defaults and a seed on the first CHECK_TRAIN_EXAMPLES examples."""
    defense = spec.make(data.name)
    seed_everything(seed)
    model = defense.build_model(build_model(data.name, data.image_shape, data.num_classes)).to(device)
    n = min(CHECK_TRAIN_EXAMPLES, len(data.y_train))
    train = TrainData(data.x_train[:n].to(device), data.y_train[:n].to(device), data.num_classes, data.name)
    counter = PassCounter()
    defense.fit(model, train, TrainContext(device, seed, counter))
    model.eval()
    return defense, model, counter


class DefenseChecker:
    """Trains a defense twice on a small slice of the data and probes what it does."""

    def __init__(self, spec: DefenseSpec, data: Dataset, device: torch.device, seed: int = 0) -> None:
        self.spec = spec
        self.data = data
        self.device = device
        self.seed = seed
        self.findings: list[Finding] = []

    def _add(self, status: str, check: str, evidence: str) -> None:
        self.findings.append(Finding(status, check, evidence))

    def run(self) -> list[Finding]:
        self._check_declarations()
        try:
            defense, model, counter = train_on_slice(self.spec, self.data, self.device, self.seed)
            _, again, _ = train_on_slice(self.spec, self.data, self.device, self.seed)
        except Exception as exc:  # noqa: BLE001 - the finding reports it
            self._add(FAIL, "builds and trains", f"{type(exc).__name__}: {exc}".splitlines()[0])
            return self.findings
        self._add(PASS, "builds and trains", f"{counter.forwards} forward / {counter.backwards} backward passes")
        self._check_reproducible(model, again)
        self._check_checkpoint(defense, model)
        deployed = defense.deploy(model)
        index = self.data.eval_indices(min(CHECK_EVAL_EXAMPLES, len(self.data.y_test)))
        x, y = self.data.x_test[index].to(self.device), self.data.y_test[index].to(self.device)
        self._check_forward(deployed, x)
        observed = observe(deployed, x, y)
        self._check_randomness(observed)
        self._check_outputs(observed)
        with torch.no_grad():  # the probe's fractions are of the examples it classifies correctly
            probed = int((predict(deployed, x[:PROBE_EXAMPLES]) == y[:PROBE_EXAMPLES]).sum())
        self._check_gradients(defense, model, observed, x, y, probed)
        self._check_dynamic(deployed, x)
        return self.findings

    def _check_declarations(self) -> None:
        spec = self.spec
        try:
            kwargs = spec.resolve_kwargs(self.data.name)
            json.dumps(kwargs)
            threats = spec.threat_models(kwargs)
        except Exception as exc:  # noqa: BLE001
            self._add(FAIL, "declarations are valid", str(exc))
            return
        bad = [t for t in threats if t.norm not in NORMS or not math.isfinite(t.eps) or t.eps <= 0]
        if bad:
            self._add(FAIL, "declarations are valid", f"trained-against threat models need a positive eps: {bad}")
            return
        described = ", ".join(f"{t.attack} {t.norm} {t.eps:g}" for t in threats) or "no threat model"
        self._add(PASS, "declarations are valid", f"kwargs serialize to JSON; trained against {described}")
        self.findings.append(defaults_finding(spec))

    def _check_reproducible(self, model: nn.Module, again: nn.Module) -> None:
        difference = _max_difference(model.state_dict(), again.state_dict())
        if difference == 0:
            self._add(PASS, "training is reproducible", "two trainings with the same seed give identical weights")
        elif self.spec.randomized:
            self._add(WARN, "training is reproducible", f"weights differ by {difference:.3g} (declared randomized)")
        else:
            self._add(
                FAIL,
                "training is reproducible",
                f"two trainings with seed {self.seed} differ by up to {difference:.3g}: draw randomness from "
                "torch's global generator (the runner seeds it) or the TrainContext generator",
            )

    def _check_checkpoint(self, defense: Defense, model: nn.Module) -> None:
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
        buffer.seek(0)
        try:
            state = torch.load(buffer, map_location=self.device, weights_only=True)
            fresh = defense.build_model(build_model(self.data.name, self.data.image_shape, self.data.num_classes))
            fresh.to(self.device).load_state_dict(state)
        except Exception as exc:  # noqa: BLE001
            self._add(FAIL, "checkpoint round-trips", f"torch.load(weights_only=True) failed: {exc}".splitlines()[0])
            return
        difference = _max_difference(model.state_dict(), fresh.state_dict())
        status = PASS if difference == 0 else FAIL
        self._add(status, "checkpoint round-trips", f"weights_only load; max weight difference {difference:.3g}")

    def _check_forward(self, deployed: nn.Module, x: torch.Tensor) -> None:
        problems = []
        with torch.no_grad():
            for batch in (x[:1], x):
                out = deployed(batch)
                expected = (len(batch), self.data.num_classes)
                if tuple(out.shape) != expected:
                    problems.append(f"batch {len(batch)} gave shape {tuple(out.shape)}, expected {expected}")
                elif not torch.isfinite(out).all():
                    problems.append(f"batch {len(batch)} gave non-finite outputs")
        if problems:
            self._add(FAIL, "forward gives finite logits", "; ".join(problems))
        else:
            self._add(
                PASS, "forward gives finite logits", f"batch sizes 1 and {len(x)}, {self.data.num_classes} classes"
            )

    def _check_randomness(self, observed: dict[str, Any]) -> None:
        difference = observed["max_output_difference"]
        if observed["randomized"] and not self.spec.randomized:
            self._add(
                FAIL,
                "deterministic unless declared randomized",
                f"identical forward passes differ by up to {difference:.3g} but the defense does not declare "
                "randomized=True (attacks then need EOT)",
            )
        elif not observed["randomized"] and self.spec.randomized:
            self._add(WARN, "deterministic unless declared randomized", "declared randomized, but passes agree")
        else:
            nature = "randomized (declared)" if self.spec.randomized else "deterministic"
            self._add(PASS, "deterministic unless declared randomized", f"{nature}; max difference {difference:.3g}")

    def _check_outputs(self, observed: dict[str, Any]) -> None:
        if observed["probability_like"] and self.spec.outputs_logits:
            self._add(
                FAIL,
                "outputs are logits",
                "outputs lie in [0, 1] and sum to 1 — probabilities, not logits; return logits or declare "
                "outputs_logits=False",
            )
        elif observed["probability_like"]:
            self._add(WARN, "outputs are logits", "outputs are probabilities (declared outputs_logits=False)")
        else:
            self._add(PASS, "outputs are logits", "outputs are not probability vectors")

    def _check_gradients(
        self,
        defense: Defense,
        model: nn.Module,
        observed: dict[str, Any],
        x: torch.Tensor,
        y: torch.Tensor,
        probed: int,
    ) -> None:
        """Vanishing gradients fail a defense by the leaderboard's own rule (``gradients_vanish``):
        one flat example of 64 is no masking, and must not fail a submission the leaderboard ranks."""
        ce, dlr = observed["vanishing_gradient_ce"], observed["vanishing_gradient_dlr"]
        n_ce, n_dlr = vanished_count(ce, probed), vanished_count(dlr, probed)
        evidence = (
            f"vanishing input gradients on {n_ce} of {probed} correctly classified examples ({ce:.0%}) with "
            f"cross-entropy, {n_dlr} ({dlr:.0%}) with DLR"
        )
        if gradients_vanish(n_dlr, probed):
            if self.spec.differentiable:
                self._add(
                    FAIL,
                    "input gradients are non-zero",
                    f"{evidence}; declare differentiable=False with a bpda_approximation",
                )
                return
            approximation = defense.gradient_approximation(model) or StraightThrough(model, defense.preprocess)
            x_grad = x.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = nn.functional.cross_entropy(approximation(x_grad), y)
                (grad,) = torch.autograd.grad(loss, x_grad)
            size = grad.flatten(1).abs().sum(1)
            if gradients_vanish(int((size < VANISHING_GRADIENT).sum()), len(size)):
                self._add(FAIL, "input gradients are non-zero", f"{evidence}; the declared approximation's also vanish")
            else:
                self._add(PASS, "input gradients are non-zero", f"{evidence}; declared non-differentiable, BPDA works")
        elif gradients_vanish(n_ce, probed) and not self.spec.saturates_softmax:
            self._add(
                FAIL,
                "input gradients are non-zero",
                f"{evidence}: the softmax saturates; declare saturates_softmax=True so logit losses are used",
            )
        elif gradients_vanish(n_ce, probed):
            self._add(WARN, "input gradients are non-zero", f"{evidence} (declared saturates_softmax)")
        elif n_ce or n_dlr:
            threshold = f"{ZERO_GRADIENT_MIN_FRACTION:.0%} and {ZERO_GRADIENT_MIN_COUNT} examples"
            self._add(PASS, "input gradients are non-zero", f"{evidence}: below the masking threshold ({threshold})")
        else:
            self._add(PASS, "input gradients are non-zero", evidence)

    def _check_dynamic(self, deployed: nn.Module, x: torch.Tensor) -> None:
        with _gradient_calls() as calls, torch.no_grad():
            deployed(x)
        if calls:
            self._add(
                FAIL,
                "no gradients inside forward",
                f"forward called {calls[0]} {len(calls)} time(s): optimisation at inference time is not modelled "
                "by the matrix's attacks",
            )
        else:
            self._add(PASS, "no gradients inside forward", "forward computes no gradients")


def defaults_finding(spec: AttackSpec | DefenseSpec) -> Finding:
    """Declared kwargs that contradict the constructor's defaults are two sources that will drift."""
    try:
        problems = kwargs_drift(spec.load(), spec.kwargs)
    except Exception as exc:  # noqa: BLE001 - the finding reports it
        return Finding(FAIL, "one source of defaults", f"cannot load the factory: {type(exc).__name__}: {exc}")
    if problems:
        return Finding(WARN, "one source of defaults", "; ".join(problems))
    return Finding(PASS, "one source of defaults", f"{len(spec.kwargs)} kwargs, all the constructor's defaults")


def _standard_model(data: Dataset, device: torch.device, seed: int) -> nn.Module:
    from bench.foundation.registry import DEFENSES

    _, model, _ = train_on_slice(DEFENSES.get("standard-v1"), data, device, seed)  # type: ignore[arg-type]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def check_attack(spec: AttackSpec, data: Dataset, device: torch.device, seed: int = 0) -> list[Finding]:
    """Attack it at a few radii on a briefly trained undefended model: inside the threat model,
    within its declared budget, reproducible with a seed, inputs untouched."""
    findings: list[Finding] = [defaults_finding(spec)]
    model = _standard_model(data, device, seed)
    index = data.eval_indices(min(CHECK_EVAL_EXAMPLES, len(data.y_test)))
    x, y = data.x_test[index].to(device), data.y_test[index].to(device)
    grid = spec.eps_grid or CHECK_EPS.get(spec.norm, (0.0,))
    for eps in grid:
        run = _attack_once(spec, data, model, x, y, eps, seed)
        if isinstance(run, Finding):
            return [*findings, run]
        x_adv, counter, bound, x_before, y_before = run
        again = _attack_once(spec, data, model, x, y, eps, seed)
        label = f"eps {eps:g}"
        inside = bool(x_adv.min() >= 0 and x_adv.max() <= 1)
        evidence = f"{label}: values in [{x_adv.min():.3g}, {x_adv.max():.3g}]"
        if spec.norm in LP_NORMS:
            size = float(perturbation_norm(x_adv - x, spec.norm).max())
            inside = inside and size <= eps * (1 + 1e-4) + 1e-5
            evidence += f", largest {spec.norm} perturbation {size:.4g}"
        findings.append(Finding(PASS if inside else FAIL, "inside the threat model", evidence))
        if bound is NO_BUDGET:
            findings.append(
                Finding(
                    WARN,
                    "budget respected",
                    f"{label}: declares no budget (a plain callable has no max_passes_per_example); "
                    f"it used {counter.forwards / len(x):.1f} forwards and {counter.backwards / len(x):.1f} "
                    "backwards per example",
                )
            )
        elif bound is None:
            findings.append(Finding(FAIL, "budget respected", f"{label}: max_passes_per_example() not declared"))
        else:
            within = counter.forwards <= bound[0] * len(x) and counter.backwards <= bound[1] * len(x)
            findings.append(
                Finding(
                    PASS if within else FAIL,
                    "budget respected",
                    f"{label}: {counter.forwards / len(x):.1f} forwards and {counter.backwards / len(x):.1f} "
                    f"backwards per example; declared at most {bound[0]} and {bound[1]}",
                )
            )
        same = not isinstance(again, Finding) and torch.equal(x_adv, again[0])
        findings.append(
            Finding(
                PASS if same else FAIL,
                "deterministic with a seed",
                f"{label}: two runs {'agree' if same else 'differ'}",
            )
        )
        untouched = torch.equal(x, x_before) and torch.equal(y, y_before)
        findings.append(Finding(PASS if untouched else FAIL, "inputs and labels untouched", label))
        fooled = float((predict(model, x_adv) != y).float().mean())
        findings.append(
            Finding(PASS if fooled > 0 else WARN, "fools an undefended model", f"{label}: {fooled:.0%} misclassified")
        )
    return findings


def _attack_once(
    spec: AttackSpec, data: Dataset, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int
) -> tuple[torch.Tensor, PassCounter, tuple[int, int] | None, torch.Tensor, torch.Tensor] | Finding:
    counter = PassCounter()
    counted = CountingModel(model, counter)
    # The surrogate's passes are counted too: a transfer attack's declared budget includes them.
    victim = Victim(counted, data.num_classes, gradient_model=counted, surrogate=counted)
    x_before, y_before = x.clone(), y.clone()
    try:
        attack = spec.make(data.name, eps=eps)
        seed_everything(seed)
        x_adv = attack(victim, x, y)
        if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
            got = tuple(x_adv.shape) if isinstance(x_adv, torch.Tensor) else type(x_adv).__name__
            return Finding(FAIL, "runs", f"eps {eps:g}: returned {got}, expected a tensor of shape {tuple(x.shape)}")
        declared = getattr(attack, "max_passes_per_example", None)
        bound = declared() if callable(declared) else NO_BUDGET
    except Exception as exc:  # noqa: BLE001
        return Finding(FAIL, "runs", f"eps {eps:g}: {type(exc).__name__}: {exc}".splitlines()[0])
    return x_adv, counter, bound, x_before, y_before


def check_defense(spec: DefenseSpec, data: Dataset, device: torch.device, seed: int = 0) -> list[Finding]:
    return DefenseChecker(spec, data, device, seed).run()
