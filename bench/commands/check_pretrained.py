"""``robustmatrix check ID`` for a model trained elsewhere: everything ``check`` verifies that needs
no training — the weights' digest, loading them into the declared architecture, finite logits (not
probabilities), determinism, input gradients by the leaderboard's rule — and its clean accuracy on
the test split next to the one its declaration claims, so a wrong normalisation or the wrong file
shows before an evaluation spends hours on it.

A failure to verify or load the weights ends the check: there is no model to probe.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from attacks.base import predict
from bench.commands.check import CHECK_EVAL_EXAMPLES, FAIL, PASS, WARN, DefenseChecker, Finding
from bench.execution.probes import PROBE_EXAMPLES, observe
from bench.foundation.config import PretrainedSpec
from bench.foundation.data import Dataset
from bench.foundation.errors import RobustMatrixError
from defenses.pretrained import Normalized, load_weights, pretrained_spec, read_state_dict

BIG_GAP = 0.05
"""A measured clean accuracy this far from the claimed one fails the check: the model evaluated is
not the one the claim is about (another preprocessing, file or architecture)."""


def accuracy_tolerance(accuracy: float, n: int) -> float:
    """How far a measured accuracy may sit from a claim and still agree: three standard errors of
    the measurement plus half a point (claims are rounded, and often on another test split)."""
    return 3 * math.sqrt(max(accuracy * (1 - accuracy), 1e-4) / n) + 0.005


class PretrainedChecker(DefenseChecker):
    """Loads the declared weights (never trains) and probes the model as ``run`` will deploy it."""

    def __init__(
        self, declaration: PretrainedSpec, data: Dataset, device: torch.device, n_eval: int | None = None
    ) -> None:
        super().__init__(pretrained_spec(declaration), data, device, seed=0)
        self.declaration = declaration
        self.n_eval = n_eval

    def run(self) -> list[Finding]:
        loaded = self._load()
        if loaded is None:
            return self.findings
        defense, model = loaded
        deployed = defense.deploy(model)
        index = self.data.eval_indices(min(CHECK_EVAL_EXAMPLES, len(self.data.y_test)))
        x, y = self.data.x_test[index].to(self.device), self.data.y_test[index].to(self.device)
        self._check_forward(deployed, x)
        if self.findings[-1].status == FAIL:
            return self.findings
        observed = observe(deployed, x, y)
        self._check_randomness(observed)
        self._check_outputs(observed)
        with torch.no_grad():
            probed = int((predict(deployed, x[:PROBE_EXAMPLES]) == y[:PROBE_EXAMPLES]).sum())
        self._check_gradients(defense, model, observed, x, y, probed)
        self._check_dynamic(deployed, x)
        self._check_clean_accuracy(deployed)
        return self.findings

    def _load(self) -> tuple[object, nn.Module] | None:
        declaration = self.declaration
        try:
            state = read_state_dict(declaration)  # verifies the digest first
        except RobustMatrixError as exc:
            digest = "sha256 of" in str(exc)
            self._add(FAIL, "weights match the declared sha256" if digest else "weights are a state_dict", str(exc))
            return None
        name = Path(declaration.weights).name
        self._add(PASS, "weights match the declared sha256", f"sha256 {declaration.sha256[:12]}… of {name}")
        try:
            defense = self.spec.make(self.data.name)
            model = defense.build_model(nn.Identity())
            assert isinstance(model, Normalized)
            load_weights(model.net, state, declaration)
        except RobustMatrixError as exc:
            self._add(FAIL, "weights load into the architecture", str(exc))
            return None
        parameters = sum(p.numel() for p in model.net.parameters())
        self._add(
            PASS,
            "weights load into the architecture",
            f"{declaration.architecture}: {len(model.net.state_dict())} tensors, {parameters:,} parameters",
        )
        model.to(self.device).eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return defense, model

    def _check_outputs(self, observed: dict) -> None:
        if observed["probability_like"]:
            self._add(
                FAIL,
                "outputs are logits",
                f"pretrained {self.declaration.id}: outputs probabilities (rows in [0, 1] summing to 1), not "
                "logits; remove the softmax",
            )
        else:
            self._add(PASS, "outputs are logits", "outputs are not probability vectors")

    def _check_clean_accuracy(self, deployed: nn.Module) -> None:
        n = self.n_eval or len(self.data.y_test)
        index = self.data.eval_indices(n)
        x, y = self.data.x_test[index], self.data.y_test[index]
        correct = 0
        with torch.no_grad():
            for start in range(0, n, 500):
                batch = x[start : start + 500].to(self.device)
                correct += int((predict(deployed, batch) == y[start : start + 500].to(self.device)).sum())
        measured = correct / n
        where = (
            f"the first {n:,} evaluation examples of {self.data.name}'s test split"
            if self.n_eval
            else f"{self.data.name}'s test split ({n:,} examples)"
        )
        claimed = self.declaration.clean_accuracy
        if claimed is None:
            self._add(PASS, "clean accuracy as claimed", f"{measured:.4f} on {where}; no clean_accuracy declared")
            return
        gap = measured - claimed
        evidence = f"measured {measured:.4f} on {where}, declared {claimed:.4f} (gap {gap:+.4f})"
        if abs(gap) <= accuracy_tolerance(measured, n):
            self._add(PASS, "clean accuracy as claimed", evidence)
        elif abs(gap) <= BIG_GAP:
            self._add(WARN, "clean accuracy as claimed", f"{evidence}: more than the measurement's error")
        else:
            self._add(
                FAIL,
                "clean accuracy as claimed",
                f"{evidence}: a big gap — check input_range/mean/std, the architecture, and that these are "
                "the weights the claim is about",
            )


def check_pretrained(
    declaration: PretrainedSpec, data: Dataset, device: torch.device, n_eval: int | None = None
) -> list[Finding]:
    return PretrainedChecker(declaration, data, device, n_eval).run()
