"""Code versions: a component's cache keys hold a digest of its code, so editing an attack re-runs
its cells and editing a defense retrains it — and nothing else is recomputed."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Any

from bench.foundation.errors import RobustMatrixError


def load_factory(factory: Callable[..., Any] | str, spec_id: str) -> Callable[..., Any]:
    if callable(factory):
        return factory
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise RobustMatrixError(f"{spec_id}: factory {factory!r} must look like 'package.module:attr'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise RobustMatrixError(f"{spec_id}: cannot load factory {factory!r}: {exc}") from exc
    return obj


_INFRASTRUCTURE = {
    "bench.registry",
    "bench.foundation.registry",
    "bench.foundation.specs",
    "bench.foundation.kwargs",
    "bench.foundation.plugins",
    "bench.foundation.versioning",
    "bench.foundation.errors",
}
"""Modules every component imports but whose edits do not change any result."""


def _module_closure(module: Any) -> list[Any]:
    """The module and every module of its own package or of robustmatrix it uses, transitively."""
    roots = {"attacks", "defenses", "verifiers", "bench", module.__name__.split(".")[0]}
    seen: dict[str, Any] = {}
    stack = [module]
    while stack:
        current = stack.pop()
        if current.__name__ in seen or current.__name__ in _INFRASTRUCTURE:
            continue
        seen[current.__name__] = current
        for value in vars(current).values():
            dependency = value if inspect.ismodule(value) else sys.modules.get(getattr(value, "__module__", "") or "")
            if dependency is not None and dependency.__name__.split(".")[0] in roots:
                stack.append(dependency)
    return [seen[name] for name in sorted(seen)]


def code_version(factory: Callable[..., Any] | str, spec_id: str) -> str:
    """A digest of the source of the factory's module and of every robustmatrix (or own-package)
    module it uses: editing a component's code changes its cache keys and re-runs its cells, and
    nobody else's."""
    obj = load_factory(factory, spec_id)
    obj = getattr(obj, "func", obj)  # a variant (functools.partial) is versioned by its factory's code
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    digest = hashlib.sha256()
    for dependency in _module_closure(module) if module is not None else []:
        try:
            digest.update(inspect.getsource(dependency).encode())
        except (OSError, TypeError):
            digest.update(dependency.__name__.encode())
    if module is None:
        digest.update(repr(obj).encode())
    return digest.hexdigest()[:16]
