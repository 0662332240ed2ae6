"""Kwargs are data: plain JSON values, stored in the database and hashed into cache keys. This
module checks them where they enter (a spec, a matrix's kwargs tables, a user override) and resolves
a component's kwargs in one order: declared defaults, the dataset's table, the user's overrides."""

from __future__ import annotations

import difflib
import fnmatch
import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from bench.foundation.errors import RobustMatrixError

if TYPE_CHECKING:
    from bench.foundation.registry import Registry
    from bench.foundation.specs import Spec

JSONScalar = (str, int, float, bool, type(None))


def check_json_value(value: Any, where: str) -> None:
    """Spec kwargs are stored in the database and hashed into cache keys, so they must be plain JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RobustMatrixError(f"{where} is {value}; kwargs must be finite numbers")
    if isinstance(value, JSONScalar):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            check_json_value(item, where)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise RobustMatrixError(f"{where} has a non-string key {key!r}")
            check_json_value(item, f"{where}.{key}")
        return
    raise RobustMatrixError(f"{where} = {value!r} is not JSON-serializable (use numbers, strings, lists)")


def freeze(mapping: Mapping[str, Any] | None, where: str) -> Mapping[str, Any]:
    mapping = dict(mapping or {})
    for key, value in mapping.items():
        check_json_value(value, f"{where}.{key}")
    return MappingProxyType(mapping)


def one_line(exc: BaseException) -> str:
    """An exception as one line: a RobustMatrixError's message as is, anything else with its type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, RobustMatrixError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_number(value: Any, name: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RobustMatrixError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise RobustMatrixError(f"{name} must be a finite number >= {minimum}, got {value!r}")
    return float(value)


def check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise RobustMatrixError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


DATASET_FAMILIES = {"mnist-t10k": "mnist"}
"""Datasets that take another's budgets: the MNIST test split is MNIST, at MNIST's published budgets."""
BUDGET_FAMILIES = ("mnist", "fashion-mnist", "cifar10")
"""Datasets every built-in attack states a budget table for, empty where its defaults already fit."""


def dataset_table(
    dataset_kwargs: Mapping[str, Mapping[str, Any]], dataset: str | None
) -> tuple[Mapping[str, Any], str]:
    """A component's kwargs table for ``dataset`` and where it came from: the dataset's own table,
    its family's (``mnist-t10k`` reads ``mnist``), or none (the constructor's defaults). The source
    is what ``robustmatrix list --dataset`` shows, so a missing table is visible, not silent."""
    if dataset is None:
        return {}, "defaults"
    if dataset in dataset_kwargs:
        return dataset_kwargs[dataset], dataset if dataset_kwargs[dataset] else f"defaults (declared for {dataset})"
    family = DATASET_FAMILIES.get(dataset)
    if family is not None and family in dataset_kwargs:
        table = dataset_kwargs[family]
        return table, f"{family} (family)" if table else f"defaults (declared for {family})"
    return {}, f"defaults (no {dataset} table)"


def resolve_kwargs_for(
    spec_id: str,
    kwargs: Mapping[str, Any],
    dataset_kwargs: Mapping[str, Mapping[str, Any]],
    dataset: str | None,
    overrides: Mapping[str, Any] | None,
) -> dict[str, Any]:
    resolved = dict(kwargs)
    resolved.update(dataset_table(dataset_kwargs, dataset)[0])
    for key, value in (overrides or {}).items():
        if key not in resolved:
            known = ", ".join(sorted(resolved)) or "none"
            raise RobustMatrixError(f"unknown kwarg '{key}' for {spec_id} (known: {known})")
        check_json_value(value, f"{spec_id} kwarg {key}")
        resolved[key] = value
    return resolved


def validate_kwarg_tables(
    tables: Mapping[str, Mapping[str, Any]], registry: Registry, selected_specs: Sequence[Spec]
) -> None:
    """Check a matrix's ``[defense_kwargs]`` or ``[attack_kwargs]`` before any work.

    A literal id must be registered and every key must be one of its kwargs. A wildcard must match
    at least one selected component, and every key must be a kwarg of at least one component it
    matches (it is applied to those that have it). Raises RobustMatrixError naming the pattern or key
    and the closest valid names."""
    table = f"{registry.kind}_kwargs"
    for pattern, values in tables.items():
        where = f'{table}."{pattern}"'
        if not isinstance(values, Mapping):
            raise RobustMatrixError(f"{where} must be a table of kwargs")
        if is_wildcard(pattern):
            targets = [s for s in selected_specs if fnmatch.fnmatchcase(s.id, pattern)]
            if not targets:
                raise RobustMatrixError(_unmatched_pattern(where, pattern, registry, selected_specs))
        else:
            targets = [registry.get(pattern)]
        known = sorted({key for spec in targets for key in spec.kwargs})
        for key, value in values.items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
                hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known) or 'none'}"
                if is_wildcard(pattern):
                    raise RobustMatrixError(f"{where}: no {registry.kind} it matches has a kwarg '{key}'; {hint}")
                raise RobustMatrixError(f"unknown kwarg '{key}' for {pattern} in {where}; {hint}")
            check_json_value(value, f"{where} kwarg {key}")


def _unmatched_pattern(where: str, pattern: str, registry: Registry, selected_specs: Sequence[Spec]) -> str:
    registered = registry.ids(pattern)
    if registered:
        shown = ", ".join(registered[:3]) + (", ..." if len(registered) > 3 else "")
        return f"{where} matches no {registry.kind} of this matrix (only {shown}, which the matrix does not select)"
    selected = [s.id for s in selected_specs]
    close = difflib.get_close_matches(pattern.strip("*?[]"), selected, n=3, cutoff=0.3) or selected[:3]
    hint = f"; the matrix's {registry.kind}s include {', '.join(close)}" if close else ""
    return f"{where} matches no {registry.kind}{hint}"


def is_wildcard(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


RUNTIME_ARGUMENTS = frozenset({"eps"})
"""Constructor arguments that are not kwargs: the harness passes them per cell (an attack's eps)."""


def constructor_defaults(factory: Callable[..., Any]) -> tuple[dict[str, Any], set[str], bool]:
    """What a factory's signature says about its kwargs: (the defaults of its named parameters, the
    names of the parameters without a default, whether it takes ``**kwargs``). A variant registered
    as ``functools.partial(factory, norm="l2")`` has that value as its default. The signature is the
    one source of a component's defaults: the registry reads them from it."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read
        return {}, set(), True
    defaults, required, open_ended = {}, set(), False
    for name, parameter in signature.parameters.items():
        if parameter.kind is parameter.VAR_KEYWORD:
            open_ended = True
        elif parameter.kind is parameter.VAR_POSITIONAL or name in RUNTIME_ARGUMENTS:
            continue
        elif parameter.default is parameter.empty:
            required.add(name)
        else:
            defaults[name] = parameter.default
    return defaults, required, open_ended


def with_constructor_defaults(factory: Callable[..., Any], declared: Mapping[str, Any]) -> dict[str, Any]:
    """A spec's kwargs: its constructor's defaults, completed by what the registration declares for
    parameters without a default (or absorbed by ``**kwargs``). A declared value that contradicts
    a default wins, as it always has for plugins; ``kwargs_drift`` names it."""
    defaults, _, _ = constructor_defaults(factory)
    return {**defaults, **declared}


def kwargs_drift(factory: Callable[..., Any], kwargs: Mapping[str, Any]) -> list[str]:
    """Where a spec's kwargs and its constructor disagree: a value unlike the constructor's default
    (two sources that drifted apart), a parameter without a default that the spec does not declare,
    or a kwarg the constructor cannot take. Empty when the signature is the one source."""
    defaults, required, open_ended = constructor_defaults(factory)
    problems = [
        f"kwarg {name}={kwargs[name]!r} but the constructor's default is {default!r}"
        for name, default in defaults.items()
        if name in kwargs and (kwargs[name] != default or type(kwargs[name]) is not type(default))
    ]
    problems += [
        f"constructor parameter {name} has no default and no declared value" for name in sorted(required - set(kwargs))
    ]
    if not open_ended:
        problems += [
            f"kwarg {name} is not a parameter of the constructor"
            for name in sorted(set(kwargs) - set(defaults) - required)
        ]
    return problems


def variant(factory: Callable[..., Any], values: Mapping[str, Any] | None) -> Callable[..., Any]:
    """``factory`` with other defaults (``norm="l2"``): one class registered as several components."""
    return functools.partial(factory, **values) if values else factory
