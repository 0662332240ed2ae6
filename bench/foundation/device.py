"""``--device auto|cpu|cuda|cuda:N``: one parser, so every entry point agrees on what a string means."""

from __future__ import annotations

import re

import torch

from bench.foundation.errors import RobustMatrixError

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:[0-9]+)$")


def resolve_device(name: str) -> torch.device:
    """Turn a device string into a usable device; auto takes CUDA when present."""
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise RobustMatrixError(f"bad device {name!r}: use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RobustMatrixError(f"device {name} requested but CUDA is not available on this machine")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise RobustMatrixError(
                f"device {name} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return torch.device("cuda", index)
    return torch.device("cpu")


def worker_devices(name: str) -> list[str]:
    """The devices local workers are pinned to, worker i to entry i (modulo the length): every visible
    GPU for ``auto`` on a CUDA machine and for ``cuda``, so N GPUs work in parallel instead of all
    workers sharing ``cuda:0``; only the named one for ``cuda:N``; the CPU otherwise."""
    device = resolve_device(name)
    if device.type == "cuda" and ":" not in name:
        return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    return [str(device)]
