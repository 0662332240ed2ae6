"""The worker side of every executor that runs jobs outside the driver's process (local worker
processes, Ray tasks): what a worker needs to know, and the one ``Workbench`` per process it keeps,
so consecutive jobs reuse the loaded data and models.
"""

from __future__ import annotations

import importlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.execution.workbench import Workbench


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
    """Where a worker finds checkpoint files (default: a folder in the node's temp directory)."""


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


def workbench_for(settings: WorkerSettings) -> Workbench:
    """This process's Workbench for ``settings`` (built on first use, with torch's thread count set)."""
    load_components(settings.modules)
    bench = _WORKBENCHES.get(settings)
    if bench is None:
        import torch

        torch.set_num_threads(settings.threads)
        cache = Path(settings.checkpoint_cache or Path(tempfile.gettempdir()) / "robustmatrix-ray" / "checkpoints")
        bench = Workbench(settings.dataset, torch.device(settings.device), cache, settings.data_dir, settings.download)
        _WORKBENCHES[settings] = bench
    return bench
