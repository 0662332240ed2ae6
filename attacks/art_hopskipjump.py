"""HopSkipJump (Chen et al. 2020) from ART: a decision-based attack — it sees only predicted labels —
that walks along the decision boundary towards the clean input. Minimum-norm (L2), unbounded and
per-sample in ART, so it is slow: small budgets on digits, the paper's on a GPU run.

ART draws its starting points from an unseeded ``np.random.RandomState()``, so two runs with the
same seed differ. We draw them ourselves — batched, from torch's seeded generator — and hand them to
ART as ``x_adv_init``; an example with no adversarial start is left clean, as ART would leave it.
Where ART still falls back to its own draw (a randomized defense labels our start differently on
ART's check), ``seeded_random_states`` seeds that generator from numpy's seeded global one."""

from __future__ import annotations

import math

import torch

from attacks.art_support import art_classifier, from_numpy, seeded_random_states, to_numpy
from attacks.base import Attack, Victim
from bench.foundation.registry import register_attack


@register_attack(
    "hopskipjump-l2-v1",
    family="decision-based",
    norm="l2",
    bounded=False,
    dataset_kwargs=dict.fromkeys(
        ("mnist", "fashion-mnist", "cifar10"),
        {"steps": 40, "queries_per_step": 1000, "initial_queries": 100, "initial_trials": 100},
    ),
    description="HopSkipJump (ART): decision-based boundary walk, minimum L2 norm, thresholded at eps",
)
class HopSkipJump(Attack):
    norm = "l2"
    bounded = False

    def __init__(
        self,
        eps: float,
        steps: int = 2,
        queries_per_step: int = 30,
        initial_queries: int = 10,
        initial_trials: int = 20,
    ) -> None:
        super().__init__(eps)
        self.steps, self.queries_per_step = int(steps), int(queries_per_step)
        self.initial_queries, self.initial_trials = int(initial_queries), int(initial_trials)

    def max_passes_per_example(self) -> tuple[int, int]:
        # Initialisation (random trials, then a binary search), then per step: the gradient
        # estimate's queries (growing as sqrt(step) up to queries_per_step), a binary search and a
        # geometric step-size search. ART's searches stop at float32 resolution (~25 halvings).
        searches = 2 * 30
        estimates = sum(
            min(self.queries_per_step, int(self.initial_queries * math.sqrt(i + 1))) for i in range(self.steps)
        )
        return self.initial_trials + searches + estimates + self.steps * searches + 1, 0

    def budget_overrides(self) -> dict[str, int | None]:
        return {"queries": self.max_passes_per_example()[0]}  # label queries, all included

    @torch.no_grad()
    def _starting_points(self, victim: Victim, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first of ``initial_trials`` uniform images that the model labels differently from x."""
        predicted = victim.model(x).argmax(1)
        start = x.clone()
        found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.initial_trials):
            if found.all():
                break
            todo = (~found).nonzero().squeeze(1)
            noise = torch.rand_like(x[todo])
            hit = victim.model(noise).argmax(1) != predicted[todo]
            start[todo[hit]] = noise[hit]
            found[todo[hit]] = True
        return start, found

    def minimal(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from art.attacks.evasion import HopSkipJump as ARTHopSkipJump

        start, found = self._starting_points(victim, x)
        x_min = x.clone()
        if not found.any():
            return x_min
        x, start = x[found], start[found]
        classifier = art_classifier(victim.model, x, victim.num_classes)
        attack = ARTHopSkipJump(
            classifier,
            batch_size=256,
            targeted=False,
            norm=2,
            max_iter=self.steps,
            max_eval=self.queries_per_step,
            init_eval=self.initial_queries,
            init_size=self.initial_trials,
            verbose=False,
        )
        with seeded_random_states():
            x_min[found] = from_numpy(attack.generate(to_numpy(x), x_adv_init=to_numpy(start)), x)
        return x_min
