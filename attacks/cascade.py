"""The adaptive worst case: an AutoAttack-style cascade. Its members run in turn, each only on the
examples every earlier member failed on, so the worst case over all of them costs little more than
its strongest member. An example counts as robust only if it survives them all.

Members are ``[attack id, kwargs]`` pairs. In a matrix the runner supplies every attack it paired
with the defense at this norm, adaptive ones first — a randomized defense's cascade starts with EOT,
a non-differentiable one's with BPDA, a saturated one's with logit-space PGD. The registered default,
for use outside a matrix, is AutoAttack's standard set available here (APGD-CE, APGD-T, Square)."""

from __future__ import annotations

from typing import Any

import torch

from attacks.base import Attack, Victim, predict
from bench.foundation.registry import ATTACKS, register_attack

DEFAULT_MEMBERS = {
    **{
        norm: [[f"apgd-ce-{norm}-v1", {}], [f"apgd-t-{norm}-v1", {}], [f"square-{norm}-v1", {}]]
        for norm in ("linf", "l2")
    },
    "l1": [["pgd-l1-v1", {}]],
}


CONFIRMING_DRAWS = 2
"""A member's success must hold on this many forward passes before its examples leave the cascade:
against a randomized defense one lucky draw would hand a still-robust example to nobody. On a
deterministic defense the second pass only costs one forward per example and member."""


class AdaptiveWorstCase(Attack):
    def __init__(self, eps: float, norm: str = "linf", members: list[Any] | None = None) -> None:
        super().__init__(eps)
        self.norm = norm
        self.members: list[Attack] = []
        for attack_id, kwargs in members or []:
            spec = ATTACKS.get(attack_id)
            if spec.norm != norm:
                raise ValueError(f"cascade member {attack_id} works in {spec.norm}, not {norm}")
            if "members" in spec.kwargs:
                raise ValueError(f"a cascade cannot contain another cascade ({attack_id})")
            self.members.append(spec.make(None, kwargs, eps=eps))

    def max_passes_per_example(self) -> tuple[int, int] | None:
        forwards = backwards = 0
        for member in self.members:
            bound = getattr(member, "max_passes_per_example", lambda: None)()
            if bound is None:
                return None  # a plugin member that declares no budget: neither does the cascade
            forwards, backwards = forwards + bound[0] + CONFIRMING_DRAWS, backwards + bound[1]
        return forwards, backwards

    def budget_overrides(self) -> dict[str, int | None]:
        """At most every member's budget, in turn: their steps (x restarts) and queries summed."""
        steps = queries = 0
        for member in self.members:
            declared = getattr(member, "declared_budget", None)
            if not callable(declared):
                continue
            budget = declared(member.spec.budget(member.kwargs) if member.spec is not None else None)
            steps += (budget.steps or 0) * (budget.restarts or 1)
            queries += budget.queries or 0
        return {"steps": steps or None, "restarts": 1 if steps else None, "queries": queries or None}

    def generate(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        result = x.clone()
        alive = torch.arange(len(x), device=x.device)
        for number, member in enumerate(self.members):
            if len(alive) == 0:
                break
            x_adv = member(victim, x[alive], y[alive])
            wrong = torch.ones(len(alive), dtype=torch.bool, device=x.device)
            for _ in range(CONFIRMING_DRAWS):
                wrong &= predict(victim.model, x_adv) != y[alive]
            # A survivor keeps the first member's attempt (the adaptive attack's): against a
            # randomized defense it may still fool the draw the result is judged on.
            keep = wrong if number > 0 else torch.ones_like(wrong)
            result[alive[keep]] = x_adv[keep]
            alive = alive[~wrong]
        return result


for _norm in ("linf", "l2", "l1"):
    register_attack(
        f"adaptive-worst-case-{_norm}-v1",
        family="adaptive",
        norm=_norm,
        variant={"norm": _norm, "members": DEFAULT_MEMBERS[_norm]},
        description=f"Adaptive worst case, {_norm}: cascade of the attacks paired with the defense, survivors only",
    )(AdaptiveWorstCase)
