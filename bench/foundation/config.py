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
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from bench.foundation.errors import RobustMatrixError

PRESETS = ("default", "quick", "mnist", "cifar10")
"""Built-in matrices, ``bench/matrices/NAME.toml``: digits (default, quick) and the published
MNIST and CIFAR-10 budgets."""

TRAINING_PRECISIONS = ("fp32", "bf16")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def dataset_family(name: str) -> str:
    """Datasets whose images and classes are the same: a model trained on one is evaluated on the other."""
    return "mnist" if name in ("mnist", "mnist-t10k") else name


@dataclass(frozen=True)
class PretrainedSpec:
    """A defense trained elsewhere (``[pretrained."ID"]``): weights verified by their sha256, loaded
    into a named or importable architecture, and evaluated like any trained defense."""

    id: str
    dataset: str
    architecture: str
    """A registered architecture name, or "module:callable" returning an nn.Module."""
    weights: str
    """Absolute path of the state_dict (relative paths are read from the matrix file's folder)."""
    sha256: str
    trained_against: tuple[tuple[str, float, str], ...] = ()
    """(norm, eps, attack) the authors trained for: the leaderboard's seen cells."""
    input_range: tuple[float, float] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    randomized: bool = False
    differentiable: bool = True
    bpda_approximation: str | None = None
    saturates_softmax: bool = False
    clean_accuracy: float | None = None
    """The clean test accuracy the authors claim (``check`` prints it next to the measured one)."""
    description: str = ""
    source: str = ""
    """Paper or URL the weights come from."""
    base_dir: str = ""
    """Folder of the matrix file: where a "module:callable" architecture is imported from."""
    distribution: str = ""
    """The plugin distribution that ships the model (``name==version``); empty for a matrix's own."""

    def to_dict(self) -> dict[str, Any]:
        """The declaration as a ``[pretrained."ID"]`` table reads (for the run's recorded config)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "id"}
        out["trained_against"] = [{"norm": n, "eps": e, "attack": a} for n, e, a in self.trained_against]
        for key in ("input_range", "mean", "std"):
            out[key] = list(out[key]) if out[key] is not None else None
        return out


_PRETRAINED_KEYS = tuple(f.name for f in fields(PretrainedSpec) if f.name != "id")
_INTERNAL_KEYS = ("base_dir", "distribution")
"""Recorded with a run's config so it reads back the same; not for a user's table."""


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
    training_precision: str = "fp32"
    """``bf16``: every training runs under bfloat16 autocast (faster on GPUs with bf16 units; its
    keys differ from fp32's). Attacks and evaluations always run in fp32: low-precision gradients
    can mask robustness (an attack that fails from rounding reports robustness that is not there)."""
    """Seconds a training may run before the driver of a worker pool or Ray kills it (None: no limit)."""
    pretrained: Mapping[str, PretrainedSpec] = field(default_factory=dict)
    """Defenses trained elsewhere, by id: evaluated with the others, never trained."""
    verifiers: tuple[str, ...] = ()
    """Verifier ids or wildcards (opt-in): each runs once per defense and Lp threat model it
    certifies, on the clean-correct evaluation examples (docs/certified.md)."""
    surrogate: str | None = None
    """The defense whose model transfer attacks craft their examples on. None: ``standard-v1``,
    trained per seed, where the matrix trains anything; in a matrix of only pretrained defenses
    (which trains nothing) the transfer attacks are then left out, with a warning. A pretrained id
    declared in the matrix makes it a model trained elsewhere."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "pretrained", MappingProxyType(dict(self.pretrained)))
        object.__setattr__(self, "eps", MappingProxyType({k: tuple(v) for k, v in self.eps.items()}))
        object.__setattr__(self, "defense_kwargs", MappingProxyType(dict(self.defense_kwargs)))
        object.__setattr__(self, "attack_kwargs", MappingProxyType(dict(self.attack_kwargs)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (recorded with each run)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["eps"] = {k: list(v) for k, v in self.eps.items()}
        out["defense_kwargs"] = {k: dict(v) for k, v in self.defense_kwargs.items()}
        out["attack_kwargs"] = {k: dict(v) for k, v in self.attack_kwargs.items()}
        out["pretrained"] = {k: v.to_dict() for k, v in self.pretrained.items()}
        for key in ("defenses", "attacks", "seeds", "verifiers"):
            out[key] = list(out[key])
        if not out["verifiers"]:  # the recorded config of a matrix without verifiers stays as it was
            del out["verifiers"]
        return out


def _fail(source: str, message: str) -> RobustMatrixError:
    return RobustMatrixError(f"{source}: {message}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _string_list(raw: Any, key: str, source: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if allow_empty and raw == []:
        return ()
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


def spec_from_mapping(
    raw: Mapping[str, Any], source: str, base: MatrixSpec | None = None, base_dir: Path | None = None
) -> MatrixSpec:
    """Validate a parsed TOML table and lay it over ``base``.

    With a ``base`` (a preset, under a user's file) tables are merged: ``eps`` norm by norm (an empty
    list drops a norm) and the kwargs tables pattern by pattern, kwarg by kwarg. Without one, the
    mapping is a complete matrix (a preset, or the config recorded with a run) and its tables are
    taken as they are, over the dataclass defaults. Relative paths of ``[pretrained]`` weights are
    read from ``base_dir`` (the matrix file's folder; default: the current directory)."""
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
        elif key in ("defenses", "attacks", "verifiers"):
            # An empty list of defenses: only the [pretrained] ones (checked once the matrix is complete).
            values[key] = _string_list(value, key, source, allow_empty=key in ("defenses", "verifiers"))
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
        elif key == "training_precision":
            if value not in TRAINING_PRECISIONS:
                raise _fail(
                    source, f"'training_precision' must be one of {', '.join(TRAINING_PRECISIONS)}, got {value!r}"
                )
            values[key] = value
        elif key == "surrogate":
            if not isinstance(value, str) or not value:
                raise _fail(source, "'surrogate' must be a defense id, like \"standard-v1\" or a [pretrained] id")
            values[key] = value
        elif key == "pretrained":
            if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
                raise _fail(source, "'pretrained' must be a table of tables, like [pretrained.\"my-model-v1\"]")
            folder = base_dir if base_dir is not None else Path.cwd()
            parsed = {name: _pretrained(name, table, source, folder) for name, table in value.items()}
            values[key] = {**base.pretrained, **parsed} if merge else parsed
    merged = {**{f.name: getattr(base, f.name) for f in fields(MatrixSpec)}, **values}
    spec = MatrixSpec(**merged)
    if not spec.defenses and not spec.pretrained:
        raise _fail(source, "'defenses' is empty and no [pretrained] defense is declared: nothing to evaluate")
    for model in spec.pretrained.values():
        if dataset_family(model.dataset) != dataset_family(spec.dataset):
            raise _fail(
                source,
                f"pretrained {model.id} was trained on {model.dataset}, but the matrix's dataset is {spec.dataset}",
            )
    return spec


def declare_pretrained(name: str, table: Mapping[str, Any], folder: str | Path) -> PretrainedSpec:
    """A ``[pretrained."ID"]`` table as a plugin declares it, checked exactly as in a matrix file;
    ``weights`` (and a "module:callable" architecture) are read from ``folder`` — a plugin passes
    its package's folder, ``Path(__file__).parent``."""
    return _pretrained(name, table, f"pretrained model {name}", Path(folder))


def with_models(spec: MatrixSpec, models: Mapping[str, PretrainedSpec]) -> MatrixSpec:
    """``spec`` with the models (plugins' declarations) its ``defenses`` select by id or wildcard
    and its dataset can evaluate; a model the matrix declares itself keeps its own table."""
    import fnmatch

    chosen = {
        name: model
        for name, model in models.items()
        if name not in spec.pretrained
        and dataset_family(model.dataset) == dataset_family(spec.dataset)
        and any(fnmatch.fnmatchcase(name, pattern) for pattern in spec.defenses)
    }
    if not chosen:
        return spec
    return replace(spec, pretrained={**spec.pretrained, **chosen})


def _pretrained(name: str, raw: Mapping[str, Any], source: str, folder: Path) -> PretrainedSpec:
    """One ``[pretrained."ID"]`` table, every field checked (one line naming the model)."""
    from bench.foundation.specs import ID_PATTERN, NORMS

    def bad(message: str) -> RobustMatrixError:
        return _fail(source, f"pretrained {name}: {message}")

    if not ID_PATTERN.match(name):
        raise bad("its id must look like 'name-v1' (lower case, digits, '.', '-', ending in -vN)")
    unknown = sorted(set(raw) - set(_PRETRAINED_KEYS))
    if unknown:
        known = ", ".join(k for k in _PRETRAINED_KEYS if k not in _INTERNAL_KEYS)
        raise bad(f"unknown key '{unknown[0]}' (known: {known})")
    for key in ("dataset", "architecture", "weights", "sha256"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise bad(f"'{key}' is required (a non-empty string)")
    sha = raw["sha256"].lower()
    if not _SHA256.match(sha):
        raise bad(f"'sha256' must be 64 hex digits (`sha256sum {raw['weights']}`), got {raw['sha256']!r}")
    threats = raw.get("trained_against", [])
    if not isinstance(threats, list) or not all(isinstance(t, Mapping) for t in threats):
        raise bad('\'trained_against\' must be a list of tables like { norm = "linf", eps = 0.3, attack = "pgd" }')
    trained: list[tuple[str, float, str]] = []
    for threat in threats:
        if set(threat) != {"norm", "eps", "attack"}:
            raise bad(f"each trained_against entry needs exactly norm, eps and attack, got {sorted(threat)}")
        if threat["norm"] not in NORMS:
            raise bad(f"trained_against norm '{threat['norm']}' is unknown (known: {', '.join(NORMS)})")
        if not _number(threat["eps"]) or threat["eps"] < 0 or not isinstance(threat["attack"], str):
            raise bad(f"trained_against needs a non-negative eps and an attack name, got {dict(threat)}")
        trained.append((threat["norm"], float(threat["eps"]), threat["attack"]))
    vectors: dict[str, tuple[float, ...] | None] = {}
    for key in ("input_range", "mean", "std"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, list) or not value or not all(_number(v) for v in value)):
            raise bad(f"'{key}' must be a list of numbers, got {value!r}")
        vectors[key] = tuple(float(v) for v in value) if value is not None else None
    if vectors["input_range"] is not None and (
        len(vectors["input_range"]) != 2 or vectors["input_range"][0] >= vectors["input_range"][1]
    ):
        raise bad(f"'input_range' must be [low, high] with low < high, got {raw['input_range']!r}")
    if vectors["std"] is not None and min(vectors["std"]) <= 0:
        raise bad("'std' must be positive")
    flags = {}
    for key, default in (("randomized", False), ("differentiable", True), ("saturates_softmax", False)):
        flags[key] = raw.get(key, default)
        if not isinstance(flags[key], bool):
            raise bad(f"'{key}' must be true or false")
    texts = {}
    for key in ("bpda_approximation", "description", "source", "distribution"):
        texts[key] = raw.get(key)
        if texts[key] is not None and not isinstance(texts[key], str):
            raise bad(f"'{key}' must be a string")
    if not flags["differentiable"] and texts["bpda_approximation"] is None:
        raise bad("a non-differentiable model must declare bpda_approximation (for example 'identity')")
    claimed = raw.get("clean_accuracy")
    if claimed is not None and (not _number(claimed) or not 0 <= claimed <= 1):
        raise bad(f"'clean_accuracy' must be a fraction in [0, 1], got {claimed!r}")
    base = Path(raw.get("base_dir") or folder)
    return PretrainedSpec(
        id=name,
        dataset=raw["dataset"],
        architecture=raw["architecture"],
        weights=str((base / raw["weights"]).resolve()),
        sha256=sha,
        trained_against=tuple(trained),
        input_range=vectors["input_range"],  # type: ignore[arg-type]
        mean=vectors["mean"],
        std=vectors["std"],
        bpda_approximation=texts["bpda_approximation"],
        clean_accuracy=float(claimed) if claimed is not None else None,
        description=texts["description"] or "",
        source=texts["source"] or "",
        base_dir=str(base.resolve()),
        distribution=texts["distribution"] or "",
        **flags,
    )


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _fail(source, f"malformed TOML: {exc}") from None


def preset(name: str = "default") -> MatrixSpec:
    """A built-in matrix by name (one of ``PRESETS``)."""
    if name not in PRESETS:
        raise RobustMatrixError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    text = resources.files("bench").joinpath(f"matrices/{name}.toml").read_text()
    return spec_from_mapping(_parse_toml(text, f"preset {name}"), f"preset {name}")


def load_spec(path: str | Path | None = None, *, quick: bool = False, preset_name: str | None = None) -> MatrixSpec:
    """The matrix to run: a preset (``preset_name``; ``quick`` is the quick one; default: the
    default one), with the user's TOML file (if any) laid over it."""
    if quick and preset_name not in (None, "quick"):
        raise RobustMatrixError(f"--quick is the quick preset: drop it or --preset {preset_name}")
    base = preset("quick" if quick else preset_name or "default")
    if path is None:
        return base
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RobustMatrixError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RobustMatrixError(f"cannot read config file {path}: {exc}") from None
    return spec_from_mapping(_parse_toml(text, str(path)), str(path), base, path.parent)
