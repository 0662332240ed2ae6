"""Registry of attacks and defenses: frozen specs with versioned ids, looked up by id or wildcard.

Built-in components register themselves next to their code with ``@register_attack`` /
``@register_defense`` (the pattern of timm's ``@register_model``); third-party ones arrive through
the entry-point groups ``robustmatrix.attacks`` and ``robustmatrix.defenses``. Neither is imported
when this module is: the CLI calls :func:`load_builtins` and :func:`load_plugins` explicitly, so a
broken plugin can only ever fail loudly, by name, at a well-defined moment.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import importlib
import inspect
import json
import math
import pkgutil
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from types import MappingProxyType
from typing import Any

from bench.errors import RobustMatrixError

NORMS = ("linf", "l2", "l1", "spatial", "none")
"""Threat-model norms. ``spatial`` is rotation/translation (eps = max rotation in degrees);
``none`` is for attacks without a perturbation set of their own."""

FAMILIES = ("gradient", "score-based", "decision-based", "transfer", "noise", "adaptive")

TRIGGERS = ("always", "randomized", "non-differentiable", "saturated-softmax")
"""When the runner pairs an attack with a defense: always, or only when the defense is (declared
or observed to be) randomized, non-differentiable, or saturating its softmax."""

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._\-]*-v[0-9]+$")

PLUGIN_GROUPS = {"defense": "robustmatrix.defenses", "attack": "robustmatrix.attacks"}

JSONScalar = (str, int, float, bool, type(None))


def _check_json_value(value: Any, where: str) -> None:
    """Spec kwargs are stored in the database and hashed into cache keys, so they must be plain JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RobustMatrixError(f"{where} is {value}; kwargs must be finite numbers")
    if isinstance(value, JSONScalar):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_json_value(item, where)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise RobustMatrixError(f"{where} has a non-string key {key!r}")
            _check_json_value(item, f"{where}.{key}")
        return
    raise RobustMatrixError(f"{where} = {value!r} is not JSON-serializable (use numbers, strings, lists)")


def _freeze(mapping: Mapping[str, Any] | None, where: str) -> Mapping[str, Any]:
    mapping = dict(mapping or {})
    for key, value in mapping.items():
        _check_json_value(value, f"{where}.{key}")
    return MappingProxyType(mapping)


def _one_line(exc: BaseException) -> str:
    """An exception as one line: a RobustMatrixError's message as is, anything else with its type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, RobustMatrixError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_number(value: Any, name: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RobustMatrixError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise RobustMatrixError(f"{name} must be a finite number >= {minimum}, got {value!r}")
    return float(value)


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise RobustMatrixError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class ThreatModel:
    """A perturbation set: a norm and a radius eps."""

    norm: str
    eps: float

    def __post_init__(self) -> None:
        _check_choice(self.norm, NORMS, "threat model norm")
        object.__setattr__(self, "eps", _check_number(self.eps, f"eps of the {self.norm} threat model"))

    def covers(self, other: ThreatModel) -> bool:
        """True when ``other`` is inside this set: same norm and no larger radius."""
        return self.norm == other.norm and other.eps <= self.eps + 1e-12


@dataclass(frozen=True)
class TrainingThreat:
    """What a defense trains against, declared statically; eps is read from the kwarg ``eps_kwarg``
    so the declaration follows per-dataset defaults and user overrides."""

    norm: str
    attack: str
    eps_kwarg: str = "eps"

    def __post_init__(self) -> None:
        _check_choice(self.norm, NORMS, "trained-against norm")

    def resolve(self, kwargs: Mapping[str, Any], defense_id: str) -> TrainedAgainst:
        if self.eps_kwarg not in kwargs:
            raise RobustMatrixError(
                f"defense {defense_id} declares training against {self.norm} with eps from kwarg "
                f"'{self.eps_kwarg}', but it has no such kwarg"
            )
        eps = _check_number(kwargs[self.eps_kwarg], f"{defense_id} kwarg {self.eps_kwarg}")
        return TrainedAgainst(norm=self.norm, eps=eps, attack=self.attack)


@dataclass(frozen=True)
class TrainedAgainst:
    """A resolved training threat model: the leaderboard's notion of a *seen* cell."""

    norm: str
    eps: float
    attack: str

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(self.norm, self.eps)


@dataclass(frozen=True)
class Budget:
    """How much work an attack may do per example; None means not applicable."""

    steps: int | None = None
    restarts: int | None = None
    queries: int | None = None
    forwards: int | None = None
    """Upper bound on forward passes per example, every pass counted (EOT draws, a surrogate, members)."""
    backwards: int | None = None
    """Upper bound on backward passes per example."""


def _resolve_kwargs(
    spec_id: str,
    kwargs: Mapping[str, Any],
    dataset_kwargs: Mapping[str, Mapping[str, Any]],
    dataset: str | None,
    overrides: Mapping[str, Any] | None,
) -> dict[str, Any]:
    resolved = dict(kwargs)
    if dataset is not None:
        resolved.update(dataset_kwargs.get(dataset, {}))
    for key, value in (overrides or {}).items():
        if key not in resolved:
            known = ", ".join(sorted(resolved)) or "none"
            raise RobustMatrixError(f"unknown kwarg '{key}' for {spec_id} (known: {known})")
        _check_json_value(value, f"{spec_id} kwarg {key}")
        resolved[key] = value
    return resolved


def _load_factory(factory: Callable[..., Any] | str, spec_id: str) -> Callable[..., Any]:
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


_INFRASTRUCTURE = {"bench.registry", "bench.errors"}
"""Modules every component imports but whose edits do not change any result."""


def _module_closure(module: Any) -> list[Any]:
    """The module and every module of its own package or of robustmatrix it uses, transitively."""
    roots = {"attacks", "defenses", "bench", module.__name__.split(".")[0]}
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
    obj = _load_factory(factory, spec_id)
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


class _SpecBase:
    id: str
    factory: Callable[..., Any] | str
    kwargs: Mapping[str, Any]
    dataset_kwargs: Mapping[str, Mapping[str, Any]]
    source: str

    def _validate_common(self, kind: str) -> None:
        if not isinstance(self.id, str) or not ID_PATTERN.match(self.id):
            raise RobustMatrixError(
                f"{kind} id {self.id!r} must be lowercase words joined by '-' with a version suffix, like 'pgd-linf-v1'"
            )
        if not (callable(self.factory) or isinstance(self.factory, str)):
            raise RobustMatrixError(f"{self.id}: factory must be a callable or a 'module:attr' string")
        object.__setattr__(self, "kwargs", _freeze(self.kwargs, f"{self.id} kwargs"))
        per_dataset = {
            name: _freeze(values, f"{self.id} kwargs for {name}")
            for name, values in dict(self.dataset_kwargs or {}).items()
        }
        for name, values in per_dataset.items():
            unknown = set(values) - set(self.kwargs)
            if unknown:
                raise RobustMatrixError(
                    f"{self.id}: per-dataset kwargs for {name} name unknown kwargs {sorted(unknown)}"
                )
        object.__setattr__(self, "dataset_kwargs", MappingProxyType(per_dataset))

    def resolve_kwargs(self, dataset: str | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults, then the dataset's defaults, then the user's overrides (which must be known)."""
        return _resolve_kwargs(self.id, self.kwargs, self.dataset_kwargs, dataset, overrides)

    def load(self) -> Callable[..., Any]:
        return _load_factory(self.factory, self.id)

    def code_version(self) -> str:
        return code_version(self.factory, self.id)

    def make(self, dataset: str | None = None, overrides: Mapping[str, Any] | None = None, **runtime: Any) -> Any:
        """Build the component (the Gymnasium ``make`` pattern): declared kwargs, then the dataset's,
        then the user's ``overrides`` (which must be known kwargs); ``runtime`` arguments that are
        not kwargs of the spec (an attack's ``eps``) are passed through."""
        kwargs = self.resolve_kwargs(dataset, overrides)
        instance = self.load()(**kwargs, **runtime)
        instance.spec = self
        instance.kwargs = kwargs
        return instance

    def factory_name(self) -> str:
        if isinstance(self.factory, str):
            return self.factory
        return f"{self.factory.__module__}:{self.factory.__qualname__}"

    def _check_construction(
        self, where: str, dataset: str | None, kwargs: Mapping[str, Any] | None, runtime: Mapping[str, Any]
    ) -> None:
        """Build the component from resolved ``kwargs`` (cheap: no training, no attack run) and turn
        a rejection into one line naming the kwargs responsible: each user-changed kwarg is tried
        alone on top of the defaults, so the message says which value is bad and why."""
        defaults = self.resolve_kwargs(dataset)
        kwargs = defaults if kwargs is None else dict(kwargs)
        unknown = sorted(set(kwargs) - set(defaults))
        if unknown:
            known = ", ".join(sorted(defaults)) or "none"
            raise RobustMatrixError(f"{where}: unknown kwarg '{unknown[0]}' (known: {known})")
        factory = self.load()

        def attempt(values: Mapping[str, Any]) -> str | None:
            try:
                factory(**values, **runtime)
            except Exception as exc:  # noqa: BLE001 - any rejection is reported as bad input
                return _one_line(exc)
            return None

        problem = attempt(kwargs)
        if problem is None:
            return
        changed = [k for k in kwargs if kwargs[k] != defaults[k] or type(kwargs[k]) is not type(defaults[k])]
        culprits = [(k, p) for k in changed if (p := attempt({**defaults, k: kwargs[k]})) is not None]
        if culprits:
            detail = "; ".join(f"kwarg {k}={kwargs[k]!r} is rejected: {p}" for k, p in culprits)
        elif changed:
            together = ", ".join(f"{k}={kwargs[k]!r}" for k in changed)
            detail = f"kwargs {together} are rejected together: {problem}"
        else:
            detail = f"its default kwargs are rejected: {problem}"
        raise RobustMatrixError(f"{where}: {detail}")


@dataclass(frozen=True)
class DefenseSpec(_SpecBase):
    """A defense, declaring honestly what it was trained against and what it is."""

    id: str
    factory: Callable[..., Any] | str
    trained_against: tuple[TrainingThreat, ...] = ()
    randomized: bool = False
    differentiable: bool = True
    bpda_approximation: str | None = None
    outputs_logits: bool = True
    saturates_softmax: bool = False
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    dataset_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    description: str = ""
    source: str = "builtin"

    def __post_init__(self) -> None:
        self._validate_common("defense")
        object.__setattr__(self, "trained_against", tuple(self.trained_against))
        for threat in self.trained_against:
            if not isinstance(threat, TrainingThreat):
                raise RobustMatrixError(f"{self.id}: trained_against entries must be TrainingThreat")
            if threat.eps_kwarg not in self.kwargs:
                raise RobustMatrixError(
                    f"{self.id}: trained-against {threat.norm} reads eps from kwarg "
                    f"'{threat.eps_kwarg}', which is not among its kwargs"
                )
        if not self.differentiable and self.bpda_approximation is None:
            raise RobustMatrixError(
                f"{self.id}: a non-differentiable defense must declare bpda_approximation "
                "(for example 'identity') so adaptive attacks can reach it"
            )

    def threat_models(self, kwargs: Mapping[str, Any]) -> tuple[TrainedAgainst, ...]:
        return tuple(t.resolve(kwargs, self.id) for t in self.trained_against)

    def validate(self, dataset: str | None, kwargs: Mapping[str, Any] | None = None) -> None:
        """Check resolved ``kwargs`` (default: the dataset's defaults) before any work: builds the
        defense object — no model, no training — and resolves its declared threat models. Raises
        RobustMatrixError with one line naming the defense, the kwarg and the problem."""
        self._check_construction(f"defense {self.id}", dataset, kwargs, {})
        self.threat_models(self.resolve_kwargs(dataset) if kwargs is None else kwargs)

    def nature(self) -> dict[str, Any]:
        return {
            "randomized": self.randomized,
            "differentiable": self.differentiable,
            "bpda_approximation": self.bpda_approximation,
            "outputs_logits": self.outputs_logits,
            "saturates_softmax": self.saturates_softmax,
        }

    def describe(self, dataset: str = "digits") -> dict[str, Any]:
        kwargs = self.resolve_kwargs(dataset)
        return {
            "id": self.id,
            "kind": "defense",
            "description": self.description,
            "source": self.source,
            **self.nature(),
            "trained_against": [asdict(t) for t in self.threat_models(kwargs)],
            "kwargs": kwargs,
            "dataset_kwargs": {k: dict(v) for k, v in self.dataset_kwargs.items()},
        }


@dataclass(frozen=True)
class AttackSpec(_SpecBase):
    """An attack, declaring its threat model, family, budget and when it applies."""

    id: str
    factory: Callable[..., Any] | str
    family: str
    norm: str
    bounded: bool = True
    eps_grid: tuple[float, ...] | None = None
    applies_to: str = "always"
    needs_surrogate: bool = False
    budget_defaults: Budget = Budget()
    """Budget fields the kwargs do not carry (FGSM is one step without a ``steps`` kwarg)."""
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    dataset_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    description: str = ""
    source: str = "builtin"

    def __post_init__(self) -> None:
        self._validate_common("attack")
        if not isinstance(self.budget_defaults, Budget):
            raise RobustMatrixError(f"{self.id}: budget_defaults must be a Budget")
        _check_choice(self.family, FAMILIES, f"{self.id} family")
        _check_choice(self.norm, NORMS, f"{self.id} norm")
        _check_choice(self.applies_to, TRIGGERS, f"{self.id} applies_to")
        if self.eps_grid is not None:
            grid = tuple(_check_number(e, f"{self.id} eps_grid entry") for e in self.eps_grid)
            object.__setattr__(self, "eps_grid", grid)

    def budget(self, kwargs: Mapping[str, Any] | None = None) -> Budget:
        """The budget per example as the attack declares it: steps, restarts and queries from the
        kwargs (or the declared defaults), completed by the built attack's ``declared_budget`` —
        noise draws and a spatial grid as queries, APGD-T's runs per target, CW's search steps, the
        per-example pass bound. Building an attack is cheap (nothing is attacked)."""
        kwargs = self.kwargs if kwargs is None else kwargs
        declared = self.budget_defaults
        from_kwargs = Budget(
            steps=kwargs.get("steps", declared.steps),
            restarts=kwargs.get("restarts", declared.restarts),
            queries=kwargs.get("queries", declared.queries),
        )
        try:
            attack = self.load()(**kwargs, eps=self.eps_grid[0] if self.eps_grid else 1.0)
        except Exception:  # noqa: BLE001 - validate() reports kwargs an attack rejects; here they only describe it
            return from_kwargs
        attack.spec, attack.kwargs = self, dict(kwargs)
        complete = getattr(attack, "declared_budget", None)
        return complete(from_kwargs) if callable(complete) else from_kwargs

    def validate(
        self, dataset: str | None, kwargs: Mapping[str, Any] | None = None, eps: float | Iterable[float] = ()
    ) -> None:
        """Check resolved ``kwargs`` (default: the dataset's defaults) before any work: builds the
        attack at each ``eps`` (cheap; nothing is attacked). Raises RobustMatrixError with one line
        naming the attack, the kwarg and the problem."""
        grid = [eps] if isinstance(eps, (int, float)) else list(eps)
        for radius in grid:
            self._check_construction(f"attack {self.id} at eps {radius:g}", dataset, kwargs, {"eps": radius})

    def describe(self, dataset: str = "digits") -> dict[str, Any]:
        kwargs = self.resolve_kwargs(dataset)
        return {
            "id": self.id,
            "kind": "attack",
            "description": self.description,
            "source": self.source,
            "family": self.family,
            "norm": self.norm,
            "bounded": self.bounded,
            "eps_grid": list(self.eps_grid) if self.eps_grid is not None else None,
            "applies_to": self.applies_to,
            "needs_surrogate": self.needs_surrogate,
            "budget": asdict(self.budget(kwargs)),
            "kwargs": kwargs,
            "dataset_kwargs": {k: dict(v) for k, v in self.dataset_kwargs.items()},
        }


Spec = DefenseSpec | AttackSpec


class Registry:
    """Specs of one kind, by id. Duplicates are refused; misses name the closest ids."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._specs: dict[str, Spec] = {}
        self._source: str | None = None

    def register(self, spec: Spec) -> Spec:
        expected = DefenseSpec if self.kind == "defense" else AttackSpec
        if not isinstance(spec, expected):
            raise RobustMatrixError(f"cannot register {spec!r} as a {self.kind}: expected {expected.__name__}")
        if self._source is not None and spec.source == "builtin":
            spec = replace(spec, source=self._source)
        if spec.id in self._specs:
            raise RobustMatrixError(
                f"{self.kind} id '{spec.id}' is already registered (by {self._specs[spec.id].source}); "
                "bump the version suffix or pick another id"
            )
        self._specs[spec.id] = spec
        return spec

    def unregister(self, spec_id: str) -> None:
        self._specs.pop(spec_id, None)

    def get(self, spec_id: str) -> Spec:
        try:
            return self._specs[spec_id]
        except KeyError:
            raise RobustMatrixError(self._unknown_message(spec_id)) from None

    def _unknown_message(self, spec_id: str) -> str:
        close = difflib.get_close_matches(spec_id, list(self._specs), n=3, cutoff=0.5)
        if not close:
            stem = re.sub(r"-v[0-9]+$", "", spec_id)
            close = [i for i in self._specs if i.startswith(stem)][:3]
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `robustmatrix list`"
        return f"unknown {self.kind} '{spec_id}'{hint}"

    def __contains__(self, spec_id: object) -> bool:
        return spec_id in self._specs

    def __iter__(self) -> Iterator[Spec]:
        return iter(sorted(self._specs.values(), key=lambda s: s.id))

    def __len__(self) -> int:
        return len(self._specs)

    def ids(self, include: str | list[str] = "*", exclude: str | list[str] | None = None) -> list[str]:
        """Ids matching any of ``include`` and none of ``exclude`` (fnmatch wildcards), sorted."""
        includes = [include] if isinstance(include, str) else list(include)
        excludes = [exclude] if isinstance(exclude, str) else list(exclude or [])
        return [
            i
            for i in sorted(self._specs)
            if any(fnmatch.fnmatchcase(i, p) for p in includes) and not any(fnmatch.fnmatchcase(i, p) for p in excludes)
        ]

    def select(self, patterns: list[str]) -> list[Spec]:
        """Resolve ids and wildcards, in order, without duplicates. A literal id must exist; a
        wildcard must match something."""
        chosen: list[str] = []
        for pattern in patterns:
            if any(ch in pattern for ch in "*?["):
                matched = self.ids(pattern)
                if not matched:
                    raise RobustMatrixError(f"no {self.kind} matches '{pattern}'; see `robustmatrix list`")
            else:
                matched = [self.get(pattern).id]
            chosen.extend(m for m in matched if m not in chosen)
        return [self._specs[i] for i in chosen]

    @contextmanager
    def attributed_to(self, source: str) -> Iterator[None]:
        """Specs registered inside this block are recorded as coming from ``source``."""
        previous, self._source = self._source, source
        try:
            yield
        finally:
            self._source = previous


DEFENSES = Registry("defense")
ATTACKS = Registry("attack")


def registry_for(kind: str) -> Registry:
    return {"defense": DEFENSES, "attack": ATTACKS}[kind]


def is_wildcard(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def closest_ids(name: str, registries: Sequence[Registry] | None = None, n: int = 3) -> list[str]:
    """The registered ids nearest to ``name`` across ``registries`` (default: defenses and attacks),
    each followed by its kind, best first."""
    registries = list(registries) if registries is not None else [DEFENSES, ATTACKS]
    kinds = {i: r.kind for r in registries for i in r.ids()}
    stem = re.sub(r"-v[0-9]+$", "", name.strip("*?[]"))
    close = difflib.get_close_matches(name, list(kinds), n=n, cutoff=0.5)
    if not close and stem:
        close = [i for i in sorted(kinds) if i.startswith(stem) or stem in i][:n]
    return [f"{i} ({kinds[i]})" for i in close]


def unknown_id_message(name: str, registries: Sequence[Registry] | None = None) -> str:
    """'unknown id ...' naming the closest ids of every registry searched (one line)."""
    registries = list(registries) if registries is not None else [DEFENSES, ATTACKS]
    what = " or ".join(r.kind for r in registries)
    close = closest_ids(name, registries)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `robustmatrix list`"
    if is_wildcard(name):
        return f"no {what} matches '{name}'{hint}"
    return f"unknown {what} '{name}'{hint}"


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
            _check_json_value(value, f"{where} kwarg {key}")


def _unmatched_pattern(where: str, pattern: str, registry: Registry, selected_specs: Sequence[Spec]) -> str:
    registered = registry.ids(pattern)
    if registered:
        shown = ", ".join(registered[:3]) + (", ..." if len(registered) > 3 else "")
        return f"{where} matches no {registry.kind} of this matrix (only {shown}, which the matrix does not select)"
    selected = [s.id for s in selected_specs]
    close = difflib.get_close_matches(pattern.strip("*?[]"), selected, n=3, cutoff=0.3) or selected[:3]
    hint = f"; the matrix's {registry.kind}s include {', '.join(close)}" if close else ""
    return f"{where} matches no {registry.kind}{hint}"


def register_defense(
    id: str, *, registry: Registry | None = None, **declared: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class or function decorator: register the decorated factory as defense ``id``."""

    def wrap(factory: Callable[..., Any]) -> Callable[..., Any]:
        (registry or DEFENSES).register(DefenseSpec(id=id, factory=factory, **declared))
        return factory

    return wrap


def register_attack(
    id: str, *, registry: Registry | None = None, **declared: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class or function decorator: register the decorated factory as attack ``id``.
    Use it several times on one class to register variants (different kwargs, same code)."""

    def wrap(factory: Callable[..., Any]) -> Callable[..., Any]:
        (registry or ATTACKS).register(AttackSpec(id=id, factory=factory, **declared))
        return factory

    return wrap


_BUILTIN_PACKAGES = ("defenses", "attacks")
_builtins_loaded = False


def load_builtins() -> None:
    """Import every module of the built-in ``attacks`` and ``defenses`` packages (idempotent)."""
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
    if isinstance(obj, (DefenseSpec, AttackSpec)):
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


def load_plugins(kinds: tuple[str, ...] = ("defense", "attack")) -> list[PluginFailure]:
    """Load third-party components from entry points. Each failure is named and returned; it does
    not stop the other plugins from loading."""
    failures: list[PluginFailure] = []
    everything = (DEFENSES, ATTACKS)
    for kind in kinds:
        registry = registry_for(kind)
        for entry_point in sorted(metadata.entry_points(group=PLUGIN_GROUPS[kind]), key=lambda e: e.name):
            dist = entry_point.dist
            source = f"{dist.name}=={dist.version}" if dist is not None else f"entry point {entry_point.name}"
            # A plugin's module may register components of either kind on import: attribute and,
            # if it fails, roll back both registries.
            before = {r.kind: set(r.ids()) for r in everything}
            try:
                with ExitStack() as attribution:
                    for each in everything:
                        attribution.enter_context(each.attributed_to(source))
                    _register_loaded(entry_point.load(), registry)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - even sys.exit() in a plugin is reported, not obeyed
                for each in everything:
                    for new_id in set(each.ids()) - before[each.kind]:
                        each.unregister(new_id)
                if isinstance(exc, SystemExit):
                    error = f"it called sys.exit({exc.code!r}) while loading"
                else:
                    error = _one_line(exc)
                failures.append(PluginFailure(kind, entry_point.name, source, error))
    return failures


def describe_all(dataset: str = "digits") -> list[dict[str, Any]]:
    """Everything registered, as JSON-ready dicts (``robustmatrix list --json``)."""
    return [spec.describe(dataset) for spec in DEFENSES] + [spec.describe(dataset) for spec in ATTACKS]


def spec_json(spec: Spec, kwargs: Mapping[str, Any]) -> str:
    """A canonical JSON of a spec with resolved kwargs, for the database."""
    payload = spec.describe()
    payload["kwargs"] = dict(kwargs)
    payload["factory"] = spec.factory_name()
    return json.dumps(payload, sort_keys=True)
