"""The worker side of every executor that runs jobs outside the driver's process (local worker
processes, Ray tasks): what a worker needs to know, and the one ``Workbench`` per process it keeps,
so consecutive jobs reuse the loaded data and models.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.execution.workbench import Workbench
from bench.foundation.config import PretrainedSpec
from bench.foundation.errors import RobustMatrixError


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs to build its Workbench; equal settings share one per process."""

    dataset: str
    device: str
    """A device string the worker can use as it is (``auto`` is resolved by the driver)."""
    data_dir: str | None = None
    download: bool = True
    threads: int = 1
    """torch's thread count in the worker: results are bit-identical at equal thread counts."""
    modules: tuple[str, ...] = ()
    """Modules that register the matrix's components, imported by a worker when an id is missing
    (built-ins and installed plugins are loaded anyway)."""
    checkpoint_cache: str | None = None
    """Where a worker finds checkpoint files (default: this user's private folder in the node's temp
    directory, see :func:`private_cache`)."""
    pretrained: tuple[PretrainedSpec, ...] = ()
    """The matrix's ``[pretrained]`` declarations, registered in the worker like the driver does."""


_WORKBENCHES: dict[WorkerSettings, Workbench] = {}
_IMPORTED: set[str] = set()


def load_components(modules: tuple[str, ...]) -> None:
    """Built-ins and plugins once per process, then any module of this matrix not yet imported
    (a worker process may serve many runs in turn)."""
    from bench.foundation.plugins import load_builtins, load_plugins

    if not _IMPORTED:
        load_builtins()
        load_plugins()  # failures were reported by the driver
        _IMPORTED.add("")
    for name in modules:
        if name not in _IMPORTED:
            importlib.import_module(name)
            _IMPORTED.add(name)


def private_cache(root: Path | None = None) -> Path:
    """This user's checkpoint cache in the shared temp directory: ``robustmatrix-ray-UID``, mode 0700.

    Every user of a node shares ``/tmp``: a folder someone else owns or may write to could hold a
    planted checkpoint that this user's jobs would load and evaluate, so such a folder is refused."""
    folder = Path(root or tempfile.gettempdir()) / f"robustmatrix-ray-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise RobustMatrixError(f"checkpoint cache {folder} is not a directory; remove it")
    if info.st_uid != os.getuid():
        raise RobustMatrixError(f"checkpoint cache {folder} belongs to another user (uid {info.st_uid}); remove it")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RobustMatrixError(
            f"checkpoint cache {folder} is writable by others (mode {stat.S_IMODE(info.st_mode):o}); chmod 700 it"
        )
    return folder / "checkpoints"


def workbench_for(settings: WorkerSettings) -> Workbench:
    """This process's Workbench for ``settings`` (built on first use, with torch's thread count set)."""
    load_components(settings.modules)
    from defenses.pretrained import register_pretrained

    register_pretrained(settings.pretrained)
    bench = _WORKBENCHES.get(settings)
    if bench is None:
        import torch

        torch.set_num_threads(settings.threads)
        device = torch.device(settings.device)
        cache = Path(settings.checkpoint_cache) if settings.checkpoint_cache else private_cache()
        bench = Workbench(settings.dataset, device, cache, settings.data_dir, settings.download)
        _WORKBENCHES[settings] = bench
    return bench
