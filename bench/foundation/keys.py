"""Cache keys and seeds: digests of everything that determines a result.

Two runs that agree on a key agree on the result, so a key present in the database is never
recomputed, and every random choice of a job is seeded from its own key — results do not depend on
the order jobs run in, on which worker runs them, or on what ran before.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from typing import Any

import torch

RESULTS_VERSION = 2
"""The harness's own share of every result: how jobs are seeded, how a cell is measured, which
examples a cascade attacks. Components' code is versioned automatically (a digest of its modules,
part of its keys); the harness is versioned by hand — bump this when a change to ``bench/`` alters
results, and every key changes, so nothing stale is reused."""


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def seed_from(key: str) -> int:
    """A 31-bit seed derived from a key (numpy's legacy seeding wants < 2**32)."""
    return int(key[:8], 16) & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


KEYED_LIBRARIES = ("torch", "numpy", "art")
"""Third-party code whose version changes results: torch and numpy run every component (kernels,
random streams), ART runs DeepFool, HopSkipJump, JPEG and the median filter. Every key carries
their versions, so after an upgrade nothing stale is reused and the nightly job sees the change."""


def keyed_versions() -> dict[str, str]:
    """The versions every cache key includes (a subset of :func:`versions`)."""
    recorded = versions()
    return {name: recorded[name] for name in KEYED_LIBRARIES}


def versions() -> dict[str, str]:
    """Versions recorded with every result."""

    def version_of(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"

    from bench import __version__

    return {
        "robustmatrix": __version__,
        "torch": torch.__version__,
        "art": version_of("adversarial-robustness-toolbox"),
        "numpy": version_of("numpy"),
        "python": platform.python_version(),
    }
