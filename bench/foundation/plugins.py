"""Loading components: the built-in ``attacks``, ``defenses`` and ``verifiers`` packages, and
third-party ones from the entry-point groups ``robustmatrix.attacks``, ``robustmatrix.defenses`` and
``robustmatrix.verifiers``, and models trained elsewhere that a plugin ships
(``robustmatrix.pretrained``: declarations, kept in :data:`PRETRAINED_MODELS` until a matrix selects
them). Nothing is
loaded on import: the CLI calls :func:`load_builtins` and :func:`load_plugins` explicitly, so a
broken plugin can only ever fail loudly, by name, at a well-defined moment (Gymnasium dropped
import-time plugin loading for the same reason)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.foundation.config import PretrainedSpec, declare_pretrained
from bench.foundation.errors import RobustMatrixError
from bench.foundation.kwargs import one_line
from bench.foundation.registry import ATTACKS, DEFENSES, VERIFIERS, Registry, registry_for
from bench.foundation.specs import AttackSpec, DefenseSpec, VerifierSpec

PLUGIN_GROUPS = {
    "defense": "robustmatrix.defenses",
    "attack": "robustmatrix.attacks",
    "verifier": "robustmatrix.verifiers",
    "pretrained": "robustmatrix.pretrained",
}

PRETRAINED_MODELS: dict[str, PretrainedSpec] = {}
"""Models shipped by plugins, by id: a matrix whose ``defenses`` select one evaluates it like its
own ``[pretrained]`` table (``bench.foundation.config.with_models``)."""


_BUILTIN_PACKAGES = ("defenses", "attacks", "verifiers")
_builtins_loaded = False


def load_builtins() -> None:
    """Import every module of the built-in component packages (idempotent)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    for package_name in _BUILTIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")
    _builtins_loaded = True


@dataclass(frozen=True)
class PluginFailure:
    kind: str
    entry_point: str
    distribution: str
    error: str

    def message(self) -> str:
        return f"{self.kind} plugin '{self.entry_point}' from {self.distribution} failed to load: {self.error}"


def _register_loaded(obj: Any, registry: Registry) -> None:
    """An entry point may name a spec, a list of specs, a module (whose import registered its
    specs), or a zero-argument callable returning specs."""
    if isinstance(obj, (DefenseSpec, AttackSpec, VerifierSpec)):
        registry.register(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _register_loaded(item, registry)
    elif inspect.ismodule(obj):
        return
    elif callable(obj):
        result = obj()
        if result is not None:
            _register_loaded(result, registry)
    else:
        raise RobustMatrixError(f"entry point gave {type(obj).__name__}, not a spec, module or callable")


def _declarations(obj: Any, folder: Path) -> list[PretrainedSpec]:
    """What a ``robustmatrix.pretrained`` entry point gives: a PretrainedSpec, a mapping of id to
    ``[pretrained]`` table (paths read from the entry point module's folder), a list of either, or
    a zero-argument callable returning them."""
    if isinstance(obj, PretrainedSpec):
        return [obj]
    if isinstance(obj, Mapping):
        return [declare_pretrained(name, table, folder) for name, table in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [d for item in obj for d in _declarations(item, folder)]
    if callable(obj) and not inspect.isclass(obj):
        return _declarations(obj(), folder)
    raise RobustMatrixError(
        f"entry point gave {type(obj).__name__}, not a PretrainedSpec, a table of declarations or a callable"
    )


def _load_pretrained(entry_point: metadata.EntryPoint, source: str) -> None:
    """Add an entry point's models to PRETRAINED_MODELS, all or none."""
    module = importlib.import_module(entry_point.module)
    folder = Path(getattr(module, "__file__", None) or ".").resolve().parent
    found = _declarations(entry_point.load(), folder)
    for model in found:
        if model.id in PRETRAINED_MODELS and PRETRAINED_MODELS[model.id].distribution != source:
            raise RobustMatrixError(
                f"model {model.id} is already shipped by {PRETRAINED_MODELS[model.id].distribution}"
            )
        if model.id in DEFENSES:
            raise RobustMatrixError(
                f"model {model.id} is already registered as a defense by {DEFENSES.get(model.id).source}"
            )
        if not Path(model.weights).is_file():
            raise RobustMatrixError(f"model {model.id}: its weights file {model.weights} is not in the package")
    if len({m.id for m in found}) != len(found):
        raise RobustMatrixError("it declares one model id twice")
    for model in found:
        PRETRAINED_MODELS[model.id] = replace(model, distribution=source)


def _load_components(entry_point: metadata.EntryPoint, source: str, registry: Any) -> None:
    """Register what an entry point gives. Its module may register components of any kind on
    import: each is attributed to ``source`` and, if loading fails, every registry is rolled back."""
    everything = (DEFENSES, ATTACKS, VERIFIERS)
    before = {r.kind: set(r.ids()) for r in everything}
    try:
        with ExitStack() as attribution:
            for each in everything:
                attribution.enter_context(each.attributed_to(source))
            _register_loaded(entry_point.load(), registry)
    except BaseException:
        for each in everything:
            for new_id in set(each.ids()) - before[each.kind]:
                each.unregister(new_id)
        raise


def load_plugins(kinds: tuple[str, ...] = ("defense", "attack", "verifier", "pretrained")) -> list[PluginFailure]:
    """Load third-party components (and shipped models) from entry points. Each failure is named and
    returned; it does not stop the other plugins from loading."""
    failures: list[PluginFailure] = []
    for kind in kinds:
        registry = None if kind == "pretrained" else registry_for(kind)
        for entry_point in sorted(metadata.entry_points(group=PLUGIN_GROUPS[kind]), key=lambda e: e.name):
            dist = entry_point.dist
            source = f"{dist.name}=={dist.version}" if dist is not None else f"entry point {entry_point.name}"
            try:
                if registry is None:
                    _load_pretrained(entry_point, source)
                else:
                    _load_components(entry_point, source, registry)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - even sys.exit() in a plugin is reported, not obeyed
                if isinstance(exc, SystemExit):
                    error = f"it called sys.exit({exc.code!r}) while loading"
                else:
                    error = one_line(exc)
                failures.append(PluginFailure(kind, entry_point.name, source, error))
    return failures
