"""What every attack shares: the victim it sees, losses, projections onto threat models, and the
contract of ``Attack.__call__`` (adversarial examples inside the eps-ball and inside [0, 1]).

An attack is one short class (the torchattacks pattern): settings in ``__init__``,
``generate(victim, x, y)`` returns adversarial images. Everything stays on the input's device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bench.foundation.specs import Budget

BOUND_TOLERANCE = 1e-5
"""Slack for float rounding when checking that an example is inside its eps-ball and [0, 1]."""


@dataclass(frozen=True)
class Victim:
    """What an attack may touch. ``model`` is the deployed defense (logits; success is judged on
    it). ``gradient_model`` is what white-box gradients go through — the defense's declared
    differentiable approximation for BPDA — and defaults to ``model``. ``surrogate`` is an
    undefended model of the same data, for transfer attacks."""

    model: nn.Module
    num_classes: int
    gradient_model: nn.Module | None = None
    surrogate: nn.Module | None = None

    def differentiable(self, bpda: bool) -> nn.Module:
        return self.gradient_model if bpda and self.gradient_model is not None else self.model


# --------------------------------------------------------------------------------------- losses
# Each returns one value per example; larger means more adversarial.


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner's logit margin max_{i != y} z_i - z_y: it does not saturate with the softmax."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.max(dim=1).values - true


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Croce & Hein's difference of logits ratio: margin divided by z_pi1 - z_pi3, so it is
    invariant to the scale of the logits (needs at least 3 classes)."""
    top = logits.sort(dim=1, descending=True).values
    return margin_loss(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """APGD-T's targeted DLR: z_t - z_y over z_pi1 - (z_pi3 + z_pi4) / 2 (needs at least 4 classes)."""
    top = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, y[:, None]).squeeze(1)
    wanted = logits.gather(1, target[:, None]).squeeze(1)
    return (wanted - true) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": ce_loss,
    "margin": margin_loss,
    "dlr": dlr_loss,
}


def loss_function(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]


def input_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    eot_samples: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient of the per-example loss with respect to the input, in one batched pass.

    With ``eot_samples > 1`` the batch is replicated and the loss averaged over the copies, which
    averages the gradient over a randomized defense's draws (Expectation over Transformation).
    Returns (gradient, per-example loss, logits averaged over draws), all detached."""
    x = x.detach().requires_grad_(True)
    batch = x.shape[0]
    with torch.enable_grad():
        inputs = x if eot_samples == 1 else x.repeat(eot_samples, *([1] * (x.dim() - 1)))
        logits = model(inputs)
        targets = y if eot_samples == 1 else y.repeat(eot_samples)
        losses = loss(logits, targets)
        if eot_samples > 1:
            losses = losses.view(eot_samples, batch).mean(0)
            logits = logits.view(eot_samples, batch, -1).mean(0)
        total = losses.sum()
        # A defense that cuts the graph (quantization, a detach) has no gradient path: report zeros,
        # which the probes read as masking, instead of crashing the attack.
        grad = torch.autograd.grad(total, x, allow_unused=True)[0] if total.requires_grad else None
    if grad is None:
        grad = torch.zeros_like(x)
    return grad.detach(), losses.detach(), logits.detach()


# ------------------------------------------------------------------------------------ geometry


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1)


def _per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def perturbation_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example size of a perturbation in the given norm."""
    flat = _flat(delta)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    if norm == "l2":
        return flat.norm(p=2, dim=1)
    if norm == "l1":
        return flat.abs().sum(dim=1)
    raise ValueError(f"no perturbation norm for threat model {norm!r}")


def project_l1_ball(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection onto the L1 ball, batched: soft-thresholding at the theta where the
    result's L1 norm is eps, found by Michelot's (1986) fixed point — theta is the mean excess over
    eps of the coordinates still above theta, and the support only shrinks, so it ends in a few
    iterations at the exact theta. It replaces the sort of Duchi et al. (2008), which on the CPU
    cost more than a forward pass of the digits CNN per step."""
    flat = _flat(delta)
    magnitude = flat.abs()
    total = magnitude.sum(dim=1, keepdim=True)
    theta = (total - eps) / flat.shape[1]
    support = magnitude > theta
    for _ in range(flat.shape[1]):
        kept = torch.where(support, magnitude, 0.0).sum(dim=1, keepdim=True)
        theta = (kept - eps) / support.sum(dim=1, keepdim=True).clamp_min(1)
        shrunk = magnitude > theta
        if torch.equal(shrunk, support):
            break
        support = shrunk
    projected = flat.sign() * (magnitude - theta).clamp_min(0)
    return torch.where(total <= eps, flat, projected).view_as(delta)


def project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project perturbations onto the eps-ball of ``norm`` (per example)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    if norm == "l2":
        norms = perturbation_norm(delta, "l2")
        factor = torch.clamp(eps / (norms + 1e-12), max=1.0)
        return delta * _per_example(factor, delta)
    if norm == "l1":
        return project_l1_ball(delta, eps)
    raise ValueError(f"cannot project onto threat model {norm!r}")


def clip_to_threat(x: torch.Tensor, x_adv: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """The nearest valid example: inside [0, 1] first, then inside the ball. Shrinking a
    perturbation toward zero keeps it inside the box, so the result satisfies both."""
    delta = x_adv.clamp(0.0, 1.0) - x
    return (x + project(delta, norm, eps)).clamp(0.0, 1.0)


def random_start(x: torch.Tensor, norm: str, eps: float, on_sphere: bool = False) -> torch.Tensor:
    """A random point of the ball (Linf: uniform cube; L2/L1: random direction, radius uniform in
    [0, eps], or exactly eps with ``on_sphere`` — APGD's start)."""
    if norm == "linf":
        delta = (torch.rand_like(x) * 2 - 1) * eps
    else:
        direction = torch.randn_like(x)
        if norm == "l1":
            direction = direction.sign() * torch.empty_like(x).exponential_()
        direction = direction / _per_example(perturbation_norm(direction, norm) + 1e-12, x)
        unit = torch.ones if on_sphere else torch.rand
        radius = unit(x.shape[0], device=x.device, dtype=x.dtype) * eps
        delta = direction * _per_example(radius, x)
    return clip_to_threat(x, x + delta, norm, eps)


def steepest_ascent(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The unit step that increases a linearised loss most within the norm ball."""
    if norm == "linf":
        return grad.sign()
    if norm == "l2":
        return grad / _per_example(perturbation_norm(grad, "l2") + 1e-12, grad)
    raise ValueError(f"no steepest-ascent step for threat model {norm!r}")


def sparse_l1_step(grad: torch.Tensor, x_adv: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Steepest ascent for L1 made practical (Tramer & Boneh's SLIDE): move only the coordinates
    whose gradient is in the top (1 - sparsity) fraction, skipping those already pushed against the
    [0, 1] box, with unit L1 norm per example."""
    flat = grad.flatten(1)
    position = x_adv.flatten(1)
    blocked = torch.where(flat > 0, position >= 1, position <= 0)  # (a zero gradient has no magnitude)
    magnitude = flat.abs().masked_fill(blocked, 0.0)
    k = max(1, int(round((1 - sparsity) * flat.shape[1])))
    threshold = magnitude.topk(k, dim=1).values[:, -1:]
    chosen = (magnitude >= threshold) & (magnitude > 0)
    direction = flat.sign() * chosen
    count = chosen.sum(dim=1, keepdim=True).clamp_min(1)
    return (direction / count).view_as(grad)


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1)


# ------------------------------------------------------------------------------------- attacks


class Attack:
    """Base class. Subclasses set ``norm`` (or take it as a kwarg) and implement ``generate``.

    ``__call__`` checks the contract every attack keeps: the output has the input's shape, is
    finite, lies in [0, 1] and inside the eps-ball. A violation is a bug in the attack and raises
    instead of being silently repaired.

    Minimum-norm attacks (``bounded = False``: CW, DeepFool, HopSkipJump) implement ``minimal``,
    which may return perturbations of any size; ``__call__`` counts success only within eps — an
    example whose minimal perturbation is larger reverts to the clean input — so one minimal run
    serves every eps (the workbench caches it)."""

    norm: str = "linf"
    bounded: bool = True
    spec: Any = None
    kwargs: dict[str, Any]

    def __init__(self, eps: float) -> None:
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = float(eps)

    def max_passes_per_example(self) -> tuple[int, int] | None:
        """Upper bound on (forwards, backwards) per example, or None if the attack does not declare one."""
        return None

    def budget_overrides(self) -> dict[str, int | None]:
        """Budget fields that the kwargs ``steps``, ``restarts`` and ``queries`` do not tell (noise
        draws, a spatial grid, APGD-T's runs per target): {} when they tell it all."""
        return {}

    def declared_budget(self, base: Budget | None = None) -> Budget:
        """The budget this attack declares, as ``robustmatrix list`` should show it: ``base`` (what
        the registry reads from the kwargs) corrected by :meth:`budget_overrides`, and — where
        ``Budget`` has the fields — the per-example pass bound of :meth:`max_passes_per_example`,
        which counts every pass the attack makes (EOT draws, surrogate passes, cascade members)."""
        values = {**asdict(base if base is not None else Budget()), **self.budget_overrides()}
        passes = self.max_passes_per_example()
        if passes is not None:
            values.update(forwards=int(passes[0]), backwards=int(passes[1]))
        known = {field.name for field in fields(Budget)}
        return Budget(**{name: value for name, value in values.items() if name in known})

    def minimal(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Unbounded attacks: the smallest adversarial example found (or x where none was)."""
        raise NotImplementedError

    def within_eps(self, x: torch.Tensor, x_min: torch.Tensor) -> torch.Tensor:
        """Threshold a minimal-perturbation result at eps: keep it where it fits, else the clean input."""
        fits = perturbation_norm(x_min - x, self.norm) <= self.eps * (1 + 1e-6)
        return torch.where(_per_example(fits, x), x_min, x)

    def generate(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.bounded:
            raise NotImplementedError
        return self.within_eps(x, self.minimal(victim, x, y))

    def __call__(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = self.generate(victim, x.detach(), y.detach()).detach()
        self._check(x, x_adv)
        return x_adv

    def _check(self, x: torch.Tensor, x_adv: torch.Tensor) -> None:
        problem = threat_model_violation(x, x_adv, self.norm, self.eps)
        if problem is not None:
            raise RuntimeError(f"{type(self).__name__} {problem}")


def threat_model_violation(x: torch.Tensor, x_adv: torch.Tensor, norm: str, eps: float) -> str | None:
    """What is wrong with ``x_adv`` as an attack's answer on ``x`` — another shape or device,
    non-finite values, outside the [0, 1] box, outside the eps-ball of an Lp norm — or None. The
    scorer asks this of every batch from every attack (a plugin that is a plain callable too): one
    attack that leaves the ball would lower every defense's worst case."""
    if x_adv.shape != x.shape or x_adv.device != x.device:
        return f"returned shape {tuple(x_adv.shape)} on {x_adv.device} for inputs {tuple(x.shape)} on {x.device}"
    if not torch.isfinite(x_adv).all():
        return "returned non-finite values"
    if len(x) and (x_adv.min() < -BOUND_TOLERANCE or x_adv.max() > 1 + BOUND_TOLERANCE):
        return f"left the [0, 1] image box (values in [{x_adv.min().item():.4g}, {x_adv.max().item():.4g}])"
    if norm in ("linf", "l2", "l1") and len(x):
        size = perturbation_norm(x_adv - x, norm).max().item()
        if size > eps * (1 + 1e-4) + BOUND_TOLERANCE:
            return f"left the {norm} ball: {size:.6f} > eps {eps}"
    return None
