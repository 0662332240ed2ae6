"""The matrix spec: which dataset, defenses, attacks, eps grid, seeds and evaluation size.

Read from TOML; every field has a default (``bench/matrices/default.toml``), so a user's file names
only what it changes. Values are type-checked here so a typo fails before anything is trained.

A user's file is laid over its preset (default or quick) key by key; tables are merged, not
replaced: ``[eps]`` replaces only the norms it names (an empty list drops a norm), and each
``[defense_kwargs."PATTERN"]`` / ``[attack_kwargs."PATTERN"]`` table is merged kwarg by kwarg with the
preset's table of the same pattern.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from bench.foundation.errors import RobustMatrixError

PRESETS = ("default", "quick")


@dataclass(frozen=True)
class MatrixSpec:
    """One benchmark matrix. ``defenses``/``attacks`` are ids or wildcards; ``eps`` maps a norm to
    its grid; kwargs tables map an id (or wildcard) to overrides of that component's kwargs."""

    dataset: str = "digits"
    defenses: tuple[str, ...] = ("*",)
    attacks: tuple[str, ...] = ("*",)
    eps: Mapping[str, tuple[float, ...]] = field(default_factory=lambda: {"linf": (0.1, 0.2, 0.3)})
    seeds: tuple[int, ...] = (0,)
    n_eval: int = 300
    batch_size: int = 500
    defense_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    attack_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    data_dir: str | None = None
    download: bool = True
    cell_timeout: float | None = None
    training_timeout: float | None = None
    """Seconds a training may run before the driver of a worker pool or Ray kills it (None: no limit)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", MappingProxyType({k: tuple(v) for k, v in self.eps.items()}))
        object.__setattr__(self, "defense_kwargs", MappingProxyType(dict(self.defense_kwargs)))
        object.__setattr__(self, "attack_kwargs", MappingProxyType(dict(self.attack_kwargs)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (recorded with each run)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["eps"] = {k: list(v) for k, v in self.eps.items()}
        out["defense_kwargs"] = {k: dict(v) for k, v in self.defense_kwargs.items()}
        out["attack_kwargs"] = {k: dict(v) for k, v in self.attack_kwargs.items()}
        for key in ("defenses", "attacks", "seeds"):
            out[key] = list(out[key])
        return out


def _fail(source: str, message: str) -> RobustMatrixError:
    return RobustMatrixError(f"{source}: {message}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _string_list(raw: Any, key: str, source: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(v, str) and v for v in raw):
        raise _fail(source, f"'{key}' must be a non-empty list of ids or wildcards")
    return tuple(raw)


def _eps_grid(raw: Any, source: str, *, allow_empty: bool = False) -> dict[str, tuple[float, ...]]:
    """The eps grid per norm. With ``allow_empty`` (a file laid over a preset), ``norm = []`` is
    kept as an empty tuple: it drops that norm from the preset's grid."""
    from bench.foundation.specs import NORMS

    if not isinstance(raw, Mapping) or not raw:
        raise _fail(source, "'eps' must be a table mapping a norm to a list of numbers, like linf = [0.1, 0.2]")
    grid = {}
    for norm, values in raw.items():
        if norm not in NORMS:
            raise _fail(source, f"eps table has unknown norm '{norm}' (known: {', '.join(NORMS)})")
        if allow_empty and values == []:
            grid[norm] = ()
            continue
        if not isinstance(values, list) or not values or not all(_number(v) and v >= 0 for v in values):
            raise _fail(source, f"eps.{norm} must be a non-empty list of non-negative numbers, got {values!r}")
        grid[norm] = tuple(sorted(float(v) for v in values))
    return grid


def _merge_tables(
    base: Mapping[str, Mapping[str, Any]], update: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Kwargs tables merged pattern by pattern, kwarg by kwarg (the update wins)."""
    merged = {pattern: dict(values) for pattern, values in base.items()}
    for pattern, values in update.items():
        merged[pattern] = {**merged.get(pattern, {}), **values}
    return merged


def _kwargs_tables(raw: Any, key: str, source: str) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, Mapping) or not all(isinstance(v, Mapping) for v in raw.values()):
        raise _fail(source, f"'{key}' must be a table of tables, like [{key}.\"pgd-linf-v1\"] steps = 40")
    return {name: dict(values) for name, values in raw.items()}


def spec_from_mapping(raw: Mapping[str, Any], source: str, base: MatrixSpec | None = None) -> MatrixSpec:
    """Validate a parsed TOML table and lay it over ``base``.

    With a ``base`` (a preset, under a user's file) tables are merged: ``eps`` norm by norm (an empty
    list drops a norm) and the kwargs tables pattern by pattern, kwarg by kwarg. Without one, the
    mapping is a complete matrix (a preset, or the config recorded with a run) and its tables are
    taken as they are, over the dataclass defaults."""
    merge = base is not None
    base = base or MatrixSpec()
    known = {f.name for f in fields(MatrixSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _fail(source, f"unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:  # only in specs recorded as JSON (TOML has no null): keep the default
            continue
        if key == "dataset":
            if not isinstance(value, str):
                raise _fail(source, "'dataset' must be a string")
            values[key] = value
        elif key in ("defenses", "attacks"):
            values[key] = _string_list(value, key, source)
        elif key == "eps":
            grid = _eps_grid(value, source, allow_empty=merge)
            if merge:
                grid = {norm: eps for norm, eps in {**base.eps, **grid}.items() if eps}
                if not grid:
                    raise _fail(source, "the eps table drops every norm; keep at least one, like linf = [0.1]")
            values[key] = grid
        elif key == "seeds":
            if (
                not isinstance(value, list)
                or not value
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
            ):
                raise _fail(source, f"'seeds' must be a non-empty list of non-negative integers, got {value!r}")
            values[key] = tuple(dict.fromkeys(value))
        elif key in ("n_eval", "batch_size"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _fail(source, f"'{key}' must be a positive integer, got {value!r}")
            values[key] = value
        elif key in ("defense_kwargs", "attack_kwargs"):
            tables = _kwargs_tables(value, key, source)
            values[key] = _merge_tables(getattr(base, key), tables) if merge else tables
        elif key == "data_dir":
            if not isinstance(value, str):
                raise _fail(source, "'data_dir' must be a path string")
            values[key] = value
        elif key == "download":
            if not isinstance(value, bool):
                raise _fail(source, "'download' must be true or false")
            values[key] = value
        elif key in ("cell_timeout", "training_timeout"):
            if not _number(value) or value <= 0:
                raise _fail(source, f"'{key}' must be a positive number of seconds, got {value!r}")
            values[key] = float(value)
    merged = {**{f.name: getattr(base, f.name) for f in fields(MatrixSpec)}, **values}
    return MatrixSpec(**merged)


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _fail(source, f"malformed TOML: {exc}") from None


def preset(name: str = "default") -> MatrixSpec:
    """A built-in matrix (``default`` or ``quick``)."""
    if name not in PRESETS:
        raise RobustMatrixError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    text = resources.files("bench").joinpath(f"matrices/{name}.toml").read_text()
    return spec_from_mapping(_parse_toml(text, f"preset {name}"), f"preset {name}")


def load_spec(path: str | Path | None = None, *, quick: bool = False) -> MatrixSpec:
    """The matrix to run: a preset, with the user's TOML file (if any) laid over it."""
    base = preset("quick" if quick else "default")
    if path is None:
        return base
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RobustMatrixError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RobustMatrixError(f"cannot read config file {path}: {exc}") from None
    return spec_from_mapping(_parse_toml(text, str(path)), str(path), base)
