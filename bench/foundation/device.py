"""``--device auto|cpu|cuda|cuda:N``: one parser, so every entry point agrees on what a string means."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

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


CUBLAS_WORKSPACE = ":4096:8"
"""cuBLAS's workspace setting that makes its matmuls deterministic (``CUBLAS_WORKSPACE_CONFIG``)."""


TRAINING_TF32_CUDNN = True
TRAINING_TF32_MATMUL = False
"""Training's TF32 flags on CUDA: torch's defaults, set explicitly (see :func:`prepare_device`)."""


def cuda_precision() -> dict[str, object]:
    """What a CUDA worker fixes about its arithmetic, keyed with every CUDA result: trainings run at
    torch's defaults (cuDNN convolutions in TF32, matmuls in fp32), evaluations and cells in full
    fp32 — TF32's ~1e-3 differences flip the points that HopSkipJump and early-stopping PGD leave on
    the decision boundary — and deterministic algorithms wherever torch has them."""
    return {
        "tf32_training": {"cudnn": TRAINING_TF32_CUDNN, "matmul": TRAINING_TF32_MATMUL},
        "tf32_evaluation": False,
        "deterministic": True,
    }


def prepare_device(device: torch.device) -> None:
    """Pin this process to ``device`` and make its seeded CUDA work reproducible: deterministic
    algorithms (a warning, not an error, where an op has none: ``grid_sample``'s backward), cuBLAS's
    deterministic workspace, no cuDNN autotuning, and the training precision of :func:`cuda_precision`
    (set, not inherited, so a caller's flags cannot change a keyed result). Nothing on the CPU."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # before cuBLAS starts
    if device.index is not None:
        torch.cuda.set_device(device)  # code that says plain "cuda" lands on this worker's GPU too
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = TRAINING_TF32_CUDNN
    torch.backends.cuda.matmul.allow_tf32 = TRAINING_TF32_MATMUL


@contextmanager
def evaluation_precision(device: torch.device) -> Iterator[None]:
    """Full fp32 (TF32 off in cuDNN and matmuls) for the block on CUDA, then the flags as they were."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before[0]
        torch.set_float32_matmul_precision(before[1])
