"""The adaptive worst case: an escalating, AutoAttack-grade cascade on the examples nothing else broke.

In a matrix the runner hands the cascade only the examples every other attack paired with the
defense at this norm and eps left robust (their cells' masks). It then escalates on those survivors:

1. ``members``: the adaptive attacks the defense's nature calls for (EOT for a randomized defense,
   BPDA for a non-differentiable one, logit losses for a saturated softmax), supplied by the runner,
   raised to the cascade's ``grade`` (more steps than their own cells ran);
2. ``stages``: APGD-CE 100 steps and APGD-T 100 steps over 9 target classes (AutoAttack's budgets,
   Croce & Hein 2020), with four retries on the survivors closest to the boundary, on every defense;
3. ``black_box_stages``: Square at AutoAttack's 5,000 queries, on a randomized or non-differentiable
   defense (its gradients cannot be trusted).

``AUTOATTACK_STAGES`` is AutoAttack's standard ensemble exactly (FAB-T over 9 targets and Square on
every defense), for a ``stages`` kwarg that must match its budgets.

Each attack runs only on the examples every earlier one failed on, so the budget goes where it
matters: a defense whose cells broke 90% of the examples costs the cascade a tenth of a full
AutoAttack run. An example counts as robust only if it survives every stage. Outside a matrix (no
members, no prior cells) the cascade is its stages on their own."""

from __future__ import annotations

from typing import Any

import torch

from attacks.base import Attack, Victim, predict
from bench.foundation.registry import ATTACKS, register_attack

AUTOATTACK_STAGES = {
    norm: [
        [f"apgd-ce-{norm}-v1", {"steps": 100}],
        [f"apgd-t-{norm}-v1", {"steps": 100, "targets": 9}],
        [f"fab-t-{norm}-v1", {"steps": 100, "targets": 9}],
        [f"square-{norm}-v1", {"queries": 5000, "p_init": 0.8, "rescale_schedule": False}],
    ]
    for norm in ("linf", "l2")
}
"""AutoAttack's standard version, stage by stage, as attacks of this registry (APGD-T and FAB-T cap
the targets at the number of wrong classes): the cascade's ``stages`` for an evaluation that must
match AutoAttack's budgets exactly (docs/components.md shows the TOML)."""

DEFAULT_STAGES = {
    norm: [
        [f"apgd-ce-{norm}-v1", {"steps": 100}],
        [f"apgd-t-{norm}-v1", {"steps": 100, "targets": 9, "retries": 4, "retry_fraction": 0.2}],
    ]
    for norm in ("linf", "l2")
}
"""The escalation on every defense: AutoAttack's white-box stages at its budgets (APGD-T capped at
the wrong classes), APGD-T then retrying four times, from new random starts, on the fifth of its
survivors it came closest to breaking: the examples AutoAttack breaks and one APGD-T run misses lie
on the boundary and fall to one start in a few (docs/autoattack.md). Measured on the default
matrix's fgsm-at-linf-v1 at Linf 0.2, the cell whose example AutoAttack alone broke with two
retries: two retries (on 20, 30 or 100% of the survivors) or three (on 30 or 50%) miss it, four on
the closest 20% break it, for 3% more passes than two. FAB-T runs as the matrix's own cell (9
targets) on every example, so its breaks are in the cascade's prior; re-running it at 100 steps broke
nothing more where measured (docs/components.md gives the numbers)."""
DEFAULT_STAGES["l1"] = [["pgd-l1-v1", {"steps": 100, "restarts": 2}]]
"""L1 has no APGD or Square here: PGD with many steps and restarts stands in."""

DEFAULT_BLACK_BOX_STAGES = {
    "linf": [["square-linf-v1", {"queries": 5000, "p_init": 0.8, "rescale_schedule": False}]],
    "l2": [["square-l2-v1", {"queries": 5000, "p_init": 0.8, "rescale_schedule": False}]],
    "l1": [],
}
"""AutoAttack's Square stage, run after ``stages`` only where gradients cannot be trusted: the
runner sets ``black_box`` for a randomized or non-differentiable defense (declared or observed).
There it breaks what no gradient does (on the JPEG defense at Linf 0.1, five examples more than at
1,000 queries); on a defense with honest gradients, where the matrix's own Square cell ran on every
example, 5,000 queries broke nothing more where measured."""

GRADE = {"steps": 100}
"""What the defense's own adaptive attacks are raised to inside the cascade (never lowered)."""

CONFIRMING_DRAWS = 2
"""A stage's success must hold on this many forward passes before its examples leave the cascade:
against a randomized defense one lucky draw would hand a still-robust example to nobody. On a
deterministic defense the second pass only costs one forward per example and stage."""


def graded(kwargs: dict[str, Any], declared: Any, grade: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with every numeric grade value it has raised to at least the grade."""
    out = dict(kwargs)
    for name, value in grade.items():
        current = out.get(name, declared.get(name))
        if isinstance(current, int) and not isinstance(current, bool) and current < value:
            out[name] = value
    return out


class AdaptiveWorstCase(Attack):
    """``members``: the defense's adaptive attacks, ``[id, kwargs]`` pairs, run first and raised to
    ``grade``; ``stages``: the escalation that follows; ``black_box_stages``: run last, only with
    ``black_box`` (the runner sets it where the defense masks gradients); ``bpda``: set the stages'
    ``bpda`` kwarg (the runner sets it for a non-differentiable defense, so APGD's gradients go
    through the defense's approximation)."""

    def __init__(
        self,
        eps: float,
        norm: str = "linf",
        members: list[Any] | None = None,
        stages: list[Any] | None = None,
        black_box_stages: list[Any] | None = None,
        grade: dict[str, Any] | None = None,
        bpda: bool = False,
        black_box: bool = False,
    ) -> None:
        super().__init__(eps)
        self.norm = norm
        stages = DEFAULT_STAGES[norm] if stages is None else stages
        if black_box:
            stages = [*stages, *(DEFAULT_BLACK_BOX_STAGES[norm] if black_box_stages is None else black_box_stages)]
        grade = GRADE if grade is None else grade
        self.members: list[Attack] = []
        for attack_id, kwargs in members or []:
            spec = self._member_spec(attack_id)
            self.members.append(spec.make(None, graded(kwargs, spec.kwargs, grade), eps=eps))
        for attack_id, kwargs in stages:
            spec = self._member_spec(attack_id)
            if bpda and "bpda" in spec.kwargs:
                kwargs = {**kwargs, "bpda": True}
            self.members.append(spec.make(None, kwargs, eps=eps))

    def _member_spec(self, attack_id: str) -> Any:
        spec = ATTACKS.get(attack_id)
        if spec.norm != self.norm:
            raise ValueError(f"cascade member {attack_id} works in {spec.norm}, not {self.norm}")
        if "stages" in spec.kwargs:
            raise ValueError(f"a cascade cannot contain another cascade ({attack_id})")
        return spec

    def max_passes_per_example(self) -> tuple[int, int] | None:
        forwards = backwards = 0
        for member in self.members:
            bound = getattr(member, "max_passes_per_example", lambda: None)()
            if bound is None:
                return None  # a plugin member that declares no budget: neither does the cascade
            forwards, backwards = forwards + bound[0] + CONFIRMING_DRAWS, backwards + bound[1]
        return forwards, backwards

    def budget_overrides(self) -> dict[str, int | None]:
        """At most every stage's budget, in turn: their steps (x restarts) and queries summed."""
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
            # A survivor keeps the first stage's attempt (the adaptive attack's): against a
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
        variant={
            "norm": _norm,
            "stages": DEFAULT_STAGES[_norm],
            "black_box_stages": DEFAULT_BLACK_BOX_STAGES[_norm],
            "grade": GRADE,
        },
        # The stages are AutoAttack's budgets on every dataset: the cascade is the evaluation's
        # ceiling, not a per-dataset quick look.
        dataset_kwargs=dict.fromkeys(("mnist", "fashion-mnist", "cifar10"), {}),
        description=f"Adaptive worst case, {_norm}: the defense's adaptive attacks at 100 steps, then "
        "APGD-CE/APGD-T at AutoAttack's budgets (and its Square where gradients cannot be trusted), on the "
        "examples no other attack broke",
    )(AdaptiveWorstCase)
