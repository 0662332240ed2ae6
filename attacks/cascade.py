"""The adaptive worst case: an AutoAttack-style cascade. Its members — the attacks the runner paired
with this defense at this norm, adaptive ones first — run in turn, each only on the examples every
earlier member failed on, so the worst case costs little more than its strongest member. An example
counts as robust only if it survives them all.

Members are ``[attack id, kwargs]`` pairs. The defaults are AutoAttack's standard components
available here (APGD-CE, APGD-T, Square); the runner puts in front of them every adaptive attack it
paired with the defense, so a randomized defense's cascade starts with EOT, a non-differentiable
one's with BPDA, a saturated one's with logit-space PGD."""

from __future__ import annotations

from typing import Any

import torch

from attacks.base import Attack, Victim, predict
from bench.registry import ATTACKS, register_attack

DEFAULT_MEMBERS = {
    **{
        norm: [[f"apgd-ce-{norm}-v1", {}], [f"apgd-t-{norm}-v1", {}], [f"square-{norm}-v1", {}]]
        for norm in ("linf", "l2")
    },
    "l1": [["pgd-l1-v1", {}]],
}


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

    def max_passes_per_example(self) -> tuple[int, int]:
        forwards = backwards = 0
        for member in self.members:
            bound = member.max_passes_per_example()
            if bound is None:
                raise ValueError(f"cascade member {type(member).__name__} declares no budget")
            forwards, backwards = forwards + bound[0] + 1, backwards + bound[1]
        return forwards, backwards

    def generate(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        result = x.clone()
        alive = torch.arange(len(x), device=x.device)
        for member in self.members:
            if len(alive) == 0:
                break
            x_adv = member(victim, x[alive], y[alive])
            wrong = predict(victim.model, x_adv) != y[alive]
            result[alive[wrong]] = x_adv[wrong]
            alive = alive[~wrong]
        return result


for _norm in ("linf", "l2", "l1"):
    register_attack(
        f"adaptive-worst-case-{_norm}-v1",
        family="adaptive",
        norm=_norm,
        kwargs={"norm": _norm, "members": DEFAULT_MEMBERS[_norm]},
        description=f"Adaptive worst case, {_norm}: cascade of the attacks paired with the defense, survivors only",
    )(AdaptiveWorstCase)
