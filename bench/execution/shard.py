"""``--shard I/N``: a deterministic slice of the matrix's cells, for clusters without Ray (Slurm arrays).

A cell belongs to shard ``int(group_key) mod N``, where the group key digests the cell's defense
training and norm: a cascade, its members and its cells at the smaller eps land in the same shard, so
the cascade sees their results. The slice depends only on keys — never on the order of the matrix
or on what ran before — so N jobs started independently cover every cell exactly once, and
``robustmatrix merge`` puts their databases back together. Every shard trains and
evaluates the defenses its cells need; shards that share one checkpoint folder (their databases in
one directory of a shared filesystem) train each defense once, each shard starting with a different
defense while the others wait for its checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from bench.foundation.errors import RobustMatrixError

T = TypeVar("T")
_SHARD = re.compile(r"^\s*([0-9]+)\s*/\s*([0-9]+)\s*$")


@dataclass(frozen=True)
class Shard:
    index: int
    """1-based, as Slurm's ``$SLURM_ARRAY_TASK_ID`` usually is."""
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = _SHARD.match(text or "")
        if not match:
            raise RobustMatrixError(f"bad shard {text!r}: use I/N with 1 <= I <= N, like --shard 2/8")
        index, count = int(match.group(1)), int(match.group(2))
        if not 1 <= index <= count:
            raise RobustMatrixError(f"bad shard {text!r}: I must be between 1 and N (got {index}/{count})")
        return cls(index, count)

    def owns(self, group_key: str) -> bool:
        return int(group_key, 16) % self.count == self.index - 1

    def rotate(self, items: Sequence[T]) -> list[T]:
        """``items`` starting at this shard's position, so concurrent shards begin different trainings."""
        if not items:
            return []
        start = (self.index - 1) % len(items)
        return [*items[start:], *items[:start]]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
