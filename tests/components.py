"""Throwaway defenses and attacks for tests, registered from a real module file so that their code
version (a digest of the module's source) behaves exactly as a user's component does: editing the
file changes the version and re-runs their cells."""

from __future__ import annotations

import importlib
import shutil
import sys
import textwrap
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from bench.foundation.registry import ATTACKS, DEFENSES


class ComponentModule:
    def __init__(self, folder: Path, source: str) -> None:
        self.folder = folder
        self.name = f"rm_test_components_{uuid.uuid4().hex[:8]}"
        self.path = folder / f"{self.name}.py"
        self.ids: set[tuple[str, str]] = set()
        self.module: ModuleType | None = None
        self.write(source)

    def write(self, source: str) -> None:
        """(Re)write the module and (re)register what it declares."""
        self.unregister()
        self.path.write_text(textwrap.dedent(source))
        shutil.rmtree(self.folder / "__pycache__", ignore_errors=True)
        sys.modules.pop(self.name, None)
        importlib.invalidate_caches()
        before = {("defense", i) for i in DEFENSES.ids()} | {("attack", i) for i in ATTACKS.ids()}
        self.module = importlib.import_module(self.name)
        after = {("defense", i) for i in DEFENSES.ids()} | {("attack", i) for i in ATTACKS.ids()}
        self.ids = after - before

    def unregister(self) -> None:
        for kind, spec_id in self.ids:
            (DEFENSES if kind == "defense" else ATTACKS).unregister(spec_id)
        self.ids = set()


@contextmanager
def components(folder: Path, source: str) -> Iterator[ComponentModule]:
    """Register the components of ``source`` for the duration of the block."""
    folder.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(folder))
    module = ComponentModule(folder, source)
    try:
        yield module
    finally:
        module.unregister()
        sys.modules.pop(module.name, None)
        sys.path.remove(str(folder))


HEADER = """
from __future__ import annotations

import math
import time

import torch
from torch.nn import functional as F

from attacks.base import Attack, clip_to_threat, input_gradient, loss_function
from bench.foundation.registry import register_attack, register_defense
from bench.foundation.specs import Budget
from defenses.base import Defense
from defenses.training import train, training_kwargs, with_training_defaults

KWARGS, DATASET_KWARGS = with_training_defaults({})
"""
