"""DeepFool (Moosavi-Dezfooli et al. 2016) from ART: iteratively steps to the nearest linearised
decision boundary. Minimum-norm (L2) and unbounded — the workbench thresholds its result at each
eps. Family gradient: it needs the gradients of every class."""

from __future__ import annotations

import torch

from attacks.art_support import art_classifier, from_numpy, to_numpy
from attacks.base import Attack, Victim
from bench.foundation.registry import register_attack


@register_attack(
    "deepfool-l2-v1",
    family="gradient",
    norm="l2",
    bounded=False,
    dataset_kwargs={"mnist": {"steps": 100}, "fashion-mnist": {"steps": 100}, "cifar10": {"steps": 100}},
    description="DeepFool (ART): nearest linearised boundary, minimum L2 norm, thresholded at eps",
)
class DeepFool(Attack):
    norm = "l2"
    bounded = False

    def __init__(self, eps: float, steps: int = 10, overshoot: float = 0.02, candidates: int = 10) -> None:
        super().__init__(eps)
        self.steps, self.overshoot, self.candidates = int(steps), float(overshoot), int(candidates)

    def max_passes_per_example(self) -> tuple[int, int]:
        # Per iteration ART takes one forward for predictions and one for the class gradients, and
        # one backward per candidate class.
        return 2 * (self.steps + 1), self.candidates * (self.steps + 1)

    def minimal(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from art.attacks.evasion import DeepFool as ARTDeepFool

        classifier = art_classifier(victim.model, x, victim.num_classes)
        attack = ARTDeepFool(
            classifier,
            max_iter=self.steps,
            epsilon=self.overshoot,
            nb_grads=min(self.candidates, victim.num_classes),
            batch_size=max(1, len(x)),
            verbose=False,
        )
        return from_numpy(attack.generate(to_numpy(x)), x)
