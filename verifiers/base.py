"""What every verifier shares: the contract of ``Verifier.__call__`` and the threat model's input set.

A verifier proves, per example, that no input in the ball around x intersected with [0, 1] changes
the model's argmax away from the label y. It is the lower bound beside the attacks' upper bound:
certified <= true robust accuracy <= every attack's robust accuracy. A model it cannot reason about
(an unsupported module, a randomized or numpy preprocessing step) is reported, not guessed:
``Certificate.status`` says why and nothing is certified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CERTIFY_MARGIN = 1e-5
"""A margin's lower bound must exceed this, not just 0: slack for float32 rounding in the bounds."""


class NotCertifiable(Exception):
    """The model contains something this verifier has no sound bound for (the message names it)."""


@dataclass(frozen=True)
class Certificate:
    """Per-example ``certified`` booleans (on the input's device); ``status`` is None when the
    verifier ran, else ``"not certifiable: <why>"`` (and nothing is certified)."""

    certified: torch.Tensor
    status: str | None = None

    @property
    def ran(self) -> bool:
        return self.status is None


class Verifier:
    """Base class; ``spec`` and ``kwargs`` are set by ``VerifierSpec.make``."""

    spec: Any = None
    kwargs: dict[str, Any]

    def certify(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
        """Per-example certified booleans; raise NotCertifiable for a model it cannot bound."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float) -> Certificate:
        if norm not in ("linf", "l2"):
            return Certificate(torch.zeros_like(y, dtype=torch.bool), f"not certifiable: norm {norm}")
        try:
            with torch.no_grad():
                certified = self.certify(model, x, y, norm, float(eps))
        except NotCertifiable as exc:
            return Certificate(torch.zeros_like(y, dtype=torch.bool), f"not certifiable: {exc}")
        return Certificate(certified.to(torch.bool).reshape(y.shape))


def input_box(x: torch.Tensor, norm: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The box [lower, upper] that contains the threat model's set: the Linf ball ∩ [0, 1] exactly;
    for L2, the Linf box of the same radius (it encloses the L2 ball) ∩ [0, 1] — sound, and loose."""
    if norm not in ("linf", "l2"):
        raise NotCertifiable(f"norm {norm}")
    return (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)


def margin_spec(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The specification matrix C (batch, classes, classes): row j is e_y - e_j, so C·z holds the
    margins z_y - z_j; row y is zero (its margin is 0, never a counterexample)."""
    eye = torch.eye(num_classes, device=y.device)
    return eye[y][:, None, :] - eye[None, :, :]


def certified_from_margins(margins: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Certified when the lower bound of every margin z_y - z_j, j != y, exceeds CERTIFY_MARGIN."""
    others = margins.scatter(1, y[:, None], float("inf"))
    return others.min(dim=1).values > CERTIFY_MARGIN
