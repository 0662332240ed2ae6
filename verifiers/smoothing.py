"""Randomized smoothing (Cohen et al. 2019): the smoothed classifier g(x) = argmax_c P(f(x + δ) = c),
δ ~ N(0, σ²I), and its L2 certificate. CERTIFY: n0 noisy draws guess the top class c_A, n more count
it, the one-sided Clopper-Pearson bound at level alpha gives p_A's lower bound, and g is constant
within L2 radius σ·Φ⁻¹(p_A) with probability at least 1 - alpha. When p_A's bound is at most 1/2
it abstains: not certified. Certified at eps exactly when c_A = y and the radius exceeds eps.

It certifies g, so only a defense that deploys a :class:`SmoothedClassifier` can be certified; the
deployed module's Monte-Carlo majority vote is the prediction attacks are scored on.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import beta, norm
from torch import nn
from torch.nn import functional as F

from bench.foundation.registry import register_verifier
from verifiers.base import NotCertifiable, Verifier


def noisy_counts(
    base: nn.Module, x: torch.Tensor, sigma: float, samples: int, num_classes: int, chunk: int = 4096
) -> torch.Tensor:
    """(batch, classes) counts of the base classifier's votes on ``samples`` Gaussian draws per
    example, the draws batched ``chunk`` images at a time across examples."""
    counts = torch.zeros(len(x), num_classes, dtype=torch.long, device=x.device)
    per = max(1, chunk // max(1, len(x)))
    done = 0
    while done < samples:
        k = min(per, samples - done)
        noisy = x.repeat_interleave(k, 0)
        votes = base(noisy + sigma * torch.randn_like(noisy)).argmax(1).view(len(x), k)
        counts += F.one_hot(votes, num_classes).sum(1)
        done += k
    return counts


class SmoothedClassifier(nn.Module):
    """g as deployed: the majority vote of ``samples`` noisy draws of ``base``, as log vote
    frequencies. The values carry the hard vote; gradients flow through the mean softmax of the
    draws (a straight-through estimate), so EOT attacks have a signal to follow."""

    def __init__(self, base: nn.Module, sigma: float, samples: int) -> None:
        super().__init__()
        self.base, self.sigma, self.samples = base, float(sigma), int(samples)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noisy = x.repeat_interleave(self.samples, 0)
        logits = self.base(noisy + self.sigma * torch.randn_like(noisy))
        soft = logits.softmax(1).view(len(x), self.samples, -1).mean(1)
        hard = F.one_hot(logits.argmax(1), logits.shape[1]).to(x.dtype).view(len(x), self.samples, -1).mean(1)
        return torch.log((soft + (hard - soft).detach()).clamp(min=1e-6))


def clopper_pearson_lower(successes: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) lower confidence bound of a binomial proportion (exact)."""
    successes = np.asarray(successes)
    bound = beta.ppf(alpha, np.maximum(successes, 1), n - successes + 1)
    return np.where(successes == 0, 0.0, bound)


def certified_radius(
    base: nn.Module, x: torch.Tensor, sigma: float, n0: int, n: int, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, certified L2 radius; -1 where CERTIFY abstains) per example."""
    k = base(x[:1]).shape[1]
    guess = noisy_counts(base, x, sigma, n0, k).argmax(1)
    counts = noisy_counts(base, x, sigma, n, k).gather(1, guess[:, None]).squeeze(1)
    p_lower = clopper_pearson_lower(counts.cpu().numpy(), n, alpha)
    radius = np.where(p_lower > 0.5, sigma * norm.ppf(np.clip(p_lower, 0.5, 1 - 1e-16)), -1.0)
    return guess, torch.as_tensor(radius, dtype=x.dtype, device=x.device)


@register_verifier(
    "smoothing-v1",
    norms=("l2",),
    certifies="smoothed",
    description="randomized smoothing certificate (Cohen et al. 2019): Clopper-Pearson, abstain = not certified",
)
class RandomizedSmoothing(Verifier):
    def __init__(self, n0: int = 100, n: int = 1000, alpha: float = 0.001) -> None:
        if not (isinstance(n0, int) and isinstance(n, int) and n0 >= 1 and n >= 1):
            raise ValueError(f"n0 and n must be integers >= 1, got {n0!r}, {n!r}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.n0, self.n, self.alpha = n0, n, float(alpha)

    def certify(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
        if not isinstance(model, SmoothedClassifier):
            raise NotCertifiable(f"{type(model).__name__} is not a Gaussian-smoothed classifier")
        if norm != "l2":
            raise NotCertifiable(f"randomized smoothing certifies L2, not {norm}")
        guess, radius = certified_radius(model.base, x, model.sigma, self.n0, self.n, self.alpha)
        return (guess == y) & (radius > eps)
