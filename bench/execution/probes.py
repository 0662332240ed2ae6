"""Observing what a defense does, whatever it declares (AutoAttack's sanity checks, automated).

The runner uses the observations to add adaptive attacks a defense did not ask for; the leaderboard
shows them as evidence beside its masking flags; ``robustmatrix check`` reports them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attacks.base import ce_loss, dlr_loss, input_gradient

PROBE_EXAMPLES = 64
VANISHING_GRADIENT = 1e-8
"""An input gradient with L1 norm below this (per example) counts as vanished."""
PROBABILITY_TOLERANCE = 1e-3
"""Rows within this of summing to 1, all entries in [0, 1]: the outputs look like probabilities."""


def observe(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Probe a deployed model on (up to PROBE_EXAMPLES of) the examples it classifies correctly."""
    x, y = x[:PROBE_EXAMPLES], y[:PROBE_EXAMPLES]
    with torch.no_grad():
        first = model(x)
        second = model(x)
    correct = first.argmax(dim=1) == y
    randomized = not torch.equal(first, second)
    probability_like = bool(
        first.min() >= 0
        and first.max() <= 1
        and torch.allclose(first.sum(dim=1), torch.ones(len(x), device=x.device), atol=PROBABILITY_TOLERANCE)
    )
    observed: dict[str, Any] = {
        "examples": len(x),
        "num_classes": int(first.shape[1]),
        "randomized": randomized,
        "max_output_difference": float((first - second).abs().max()) if len(x) else 0.0,
        "probability_like": probability_like,
    }
    for name, loss in (("ce", ce_loss), ("dlr", dlr_loss)):
        if correct.any():
            grad, _, _ = input_gradient(model, x[correct], y[correct], loss)
            size = grad.flatten(1).abs().sum(dim=1)
            observed[f"zero_gradient_{name}"] = float((size == 0).float().mean())
            observed[f"vanishing_gradient_{name}"] = float((size < VANISHING_GRADIENT).float().mean())
        else:
            observed[f"zero_gradient_{name}"] = 0.0
            observed[f"vanishing_gradient_{name}"] = 0.0
    return observed


def behaves_randomized(observed: dict[str, Any]) -> bool:
    return bool(observed.get("randomized"))


def behaves_non_differentiable(observed: dict[str, Any]) -> bool:
    """Gradients vanish even for a scale-free logit loss: no loss change will help, BPDA might."""
    return observed.get("vanishing_gradient_dlr", 0.0) > 0.0


def behaves_saturated(observed: dict[str, Any]) -> bool:
    """Cross-entropy gradients vanish or outputs are probabilities: logit-space losses apply."""
    return observed.get("vanishing_gradient_ce", 0.0) > 0.0 or bool(observed.get("probability_like"))
