"""PGD (Madry et al. 2018): iterated steepest-ascent steps projected back onto the eps-ball, from a
random start, with restarts. Examples stop as soon as they are misclassified (and restarts run only
on examples still robust), so a strong attack on a weak model costs little."""

from __future__ import annotations

import torch

from attacks.base import (
    Attack,
    Victim,
    clip_to_threat,
    input_gradient,
    loss_function,
    predict,
    random_start,
    sparse_l1_step,
    steepest_ascent,
)
from bench.foundation.registry import register_attack

PUBLISHED = {
    "mnist": {"steps": 100},
    "fashion-mnist": {"steps": 100},
    "cifar10": {"steps": 20},
}
"""Evaluation budgets from the papers, for GPU runs; digits keeps the quick 20 steps."""


@register_attack(
    "pgd-linf-v1",
    family="gradient",
    norm="linf",
    dataset_kwargs=PUBLISHED,
    description="Projected gradient descent, Linf, cross-entropy, random start",
)
class PGD(Attack):
    """``rel_step`` is the step size as a fraction of eps; None means 2.5 / steps (Madry et al.).
    ``early_stop=False`` returns the last iterate of every example (what adversarial training wants)."""

    def __init__(
        self,
        eps: float,
        norm: str = "linf",
        steps: int = 20,
        restarts: int = 1,
        rel_step: float | None = None,
        random_start: bool = True,
        loss: str = "ce",
        eot_samples: int = 1,
        bpda: bool = False,
        early_stop: bool = True,
        l1_sparsity: float = 0.9,
    ) -> None:
        super().__init__(eps)
        if steps < 1 or restarts < 1 or eot_samples < 1:
            raise ValueError("steps, restarts and eot_samples must be >= 1")
        self.norm = norm
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.step_size = (2.5 / self.steps if rel_step is None else float(rel_step)) * self.eps
        self.random_start = bool(random_start)
        self.loss = loss_function(loss)
        self.eot_samples = int(eot_samples)
        self.bpda = bool(bpda)
        self.early_stop = bool(early_stop)
        if not 0 <= l1_sparsity < 1:
            raise ValueError(f"l1_sparsity must be in [0, 1), got {l1_sparsity}")
        self.l1_sparsity = float(l1_sparsity)

    def max_passes_per_example(self) -> tuple[int, int]:
        per_restart = self.steps * self.eot_samples
        return (per_restart + 1) * self.restarts, per_restart * self.restarts

    def generate(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        best = x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            todo = (~fooled).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            found_x, found = self._one_run(victim, x[todo], y[todo])
            best[todo] = found_x
            fooled[todo] = found
        return best

    def _one_run(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = victim.differentiable(self.bpda)
        x_adv = random_start(x, self.norm, self.eps) if self.random_start else x.clone()
        best = x_adv.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        running = torch.arange(len(x), device=x.device)
        for _ in range(self.steps):
            current = x_adv[running]
            grad, _, logits = input_gradient(model, current, y[running], self.loss, self.eot_samples)
            wrong = logits.argmax(dim=1) != y[running]
            if self.early_stop and wrong.any():
                hit = running[wrong]
                best[hit] = current[wrong]
                fooled[hit] = True
                keep = ~wrong
                running, current, grad = running[keep], current[keep], grad[keep]
                if len(running) == 0:
                    return best, fooled
            direction = (
                sparse_l1_step(grad, current, self.l1_sparsity)
                if self.norm == "l1"
                else steepest_ascent(grad, self.norm)
            )
            stepped = current + self.step_size * direction
            x_adv[running] = clip_to_threat(x[running], stepped, self.norm, self.eps)
        last = x_adv[running]
        best[running] = last
        fooled[running] = predict(victim.model, last) != y[running]
        return best, fooled


def _variant(attack_id: str, family: str, norm: str, description: str, applies_to: str = "always", **values) -> None:
    """Register PGD under another id with other defaults (the constructor stays their one source)."""
    register_attack(
        attack_id,
        family=family,
        norm=norm,
        applies_to=applies_to,
        variant={"norm": norm, **values},
        dataset_kwargs=PUBLISHED,
        description=description,
    )(PGD)


_variant("pgd-l2-v1", "gradient", "l2", "Projected gradient descent, L2, cross-entropy, random start")
_variant("pgd-l1-v1", "gradient", "l1", "Projected gradient descent, L1, sparse steps (SLIDE), random start")
for _norm in ("linf", "l2", "l1"):
    if _norm != "l1":
        _variant(
            f"pgd-margin-{_norm}-v1",
            "gradient",
            _norm,
            f"Logit-margin PGD, {_norm}: the Carlini-Wagner margin loss, which does not saturate with the softmax",
            loss="margin",
        )
    _variant(
        f"eot-pgd-{_norm}-v1",
        "adaptive",
        _norm,
        f"EOT-PGD, {_norm}: gradients averaged over 6 draws of a randomized defense, all steps (Athalye et al. 2018)",
        applies_to="randomized",
        eot_samples=6,
        # Stopping at the first misclassifying draw leaves a point that fools one draw of the
        # randomness, not the next: against a randomized defense every step is taken.
        early_stop=False,
    )
    _variant(
        f"bpda-pgd-{_norm}-v1",
        "adaptive",
        _norm,
        f"BPDA-PGD, {_norm}: backward pass through the defense's differentiable approximation, margin loss",
        applies_to="non-differentiable",
        bpda=True,
        loss="margin",
    )
    _variant(
        f"logit-pgd-{_norm}-v1",
        "adaptive",
        _norm,
        f"Logit-space PGD, {_norm}: margin loss with 2 restarts, for defenses whose softmax saturates",
        applies_to="saturated-softmax",
        loss="margin",
        restarts=2,
    )
