"""Small trained models shared by the attack tests, trained once per test process (a module-level
cache, so every test module that asks gets the same model without a conftest fixture)."""

from __future__ import annotations

from functools import cache

from tests.conftest import Trained, train_defense


@cache
def robust_digits() -> Trained:
    """``pgd-at-linf-v1`` on digits, 8 epochs, seed 0: a model where attacks run (almost) their whole
    budget instead of stopping early, and where their strength shows (an undefended one falls to
    anything)."""
    from bench.foundation.data import load_dataset

    return train_defense("pgd-at-linf-v1", load_dataset("digits"), epochs=8)
