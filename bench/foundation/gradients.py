"""When vanishing input gradients count as gradient masking: one rule for ``robustmatrix check``
and the leaderboard's ``zero-gradients`` flag, so a defense that passes one is not flagged by the
other (and one flat example does not fail a legitimate submission)."""

from __future__ import annotations

ZERO_GRADIENT_MIN_FRACTION = 0.10
"""Input gradients must vanish on at least this fraction of the probed, correctly classified
examples (cross-entropy or DLR) ..."""
ZERO_GRADIENT_MIN_COUNT = 3
"""... and on at least this many of them: one example with a flat loss surface (it happens on a
randomized model) is not gradient masking. Masking defenses are far above both: distillation's
cross-entropy gradients vanish on ~90% of examples, quantization's and JPEG's on all of them."""


def gradients_vanish(vanished: int, probed: int) -> bool:
    """Whether ``vanished`` of ``probed`` examples with a vanishing input gradient is masking."""
    return probed > 0 and vanished >= ZERO_GRADIENT_MIN_COUNT and vanished / probed >= ZERO_GRADIENT_MIN_FRACTION


def vanished_count(fraction: float, probed: int) -> int:
    """The number of examples behind a probe's fraction (``observed`` stores fractions)."""
    return round(float(fraction) * probed)
