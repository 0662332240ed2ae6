"""Component specs: frozen dataclasses that say what a defense or an attack is, what it declares
(threat models trained against, nature, family, budget) and how to build it (the Gymnasium ``make``
pattern), with versioned ids."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

from bench.foundation.errors import RobustMatrixError
from bench.foundation.kwargs import (
    check_choice,
    check_number,
    dataset_table,
    freeze,
    one_line,
    resolve_kwargs_for,
    with_constructor_defaults,
)
from bench.foundation.versioning import code_version, load_factory

NORMS = ("linf", "l2", "l1", "spatial", "none")
"""Threat-model norms. ``spatial`` is rotation/translation (eps = max rotation in degrees);
``none`` is for attacks without a perturbation set of their own."""

FAMILIES = ("gradient", "score-based", "decision-based", "transfer", "noise", "adaptive", "reference")

TRIGGERS = ("always", "randomized", "non-differentiable", "saturated-softmax")
"""When the runner pairs an attack with a defense: always, or only when the defense is (declared
or observed to be) randomized, non-differentiable, or saturating its softmax."""

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._\-]*-v[0-9]+$")


@dataclass(frozen=True)
class ThreatModel:
    """A perturbation set: a norm and a radius eps."""

    norm: str
    eps: float

    def __post_init__(self) -> None:
        check_choice(self.norm, NORMS, "threat model norm")
        object.__setattr__(self, "eps", check_number(self.eps, f"eps of the {self.norm} threat model"))

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
        check_choice(self.norm, NORMS, "trained-against norm")

    def resolve(self, kwargs: Mapping[str, Any], defense_id: str) -> TrainedAgainst:
        if self.eps_kwarg not in kwargs:
            raise RobustMatrixError(
                f"defense {defense_id} declares training against {self.norm} with eps from kwarg "
                f"'{self.eps_kwarg}', but it has no such kwarg"
            )
        eps = check_number(kwargs[self.eps_kwarg], f"{defense_id} kwarg {self.eps_kwarg}")
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
        kwargs = dict(self.kwargs or {})
        if callable(self.factory):  # a 'module:attr' factory is read lazily; its kwargs are as declared
            kwargs = with_constructor_defaults(self.factory, kwargs)
        object.__setattr__(self, "kwargs", freeze(kwargs, f"{self.id} kwargs"))
        per_dataset = {
            name: freeze(values, f"{self.id} kwargs for {name}")
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
        return resolve_kwargs_for(self.id, self.kwargs, self.dataset_kwargs, dataset, overrides)

    def load(self) -> Callable[..., Any]:
        return load_factory(self.factory, self.id)

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
        factory = getattr(self.factory, "func", self.factory)  # a variant: functools.partial
        return f"{factory.__module__}:{factory.__qualname__}"

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
                return one_line(exc)
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
    opt_in: bool = False
    """Selected only by its literal id or a wildcard that spells the start of its name, never by
    ``*``: a new kind of defense (certified training) joins a matrix that asks for it without
    changing the default matrix's defenses, cells or cache keys."""

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
            "opt_in": self.opt_in,
            **self.nature(),
            "trained_against": [asdict(t) for t in self.threat_models(kwargs)],
            "kwargs": kwargs,
            "kwargs_from": dataset_table(self.dataset_kwargs, dataset)[1],
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
        check_choice(self.family, FAMILIES, f"{self.id} family")
        check_choice(self.norm, NORMS, f"{self.id} norm")
        check_choice(self.applies_to, TRIGGERS, f"{self.id} applies_to")
        if self.eps_grid is not None:
            grid = tuple(check_number(e, f"{self.id} eps_grid entry") for e in self.eps_grid)
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
            "kwargs_from": dataset_table(self.dataset_kwargs, dataset)[1],
            "dataset_kwargs": {k: dict(v) for k, v in self.dataset_kwargs.items()},
        }


VERIFIER_NORMS = ("linf", "l2")
"""The threat models a verifier can certify: Lp balls intersected with the [0, 1] box."""


@dataclass(frozen=True)
class VerifierSpec(_SpecBase):
    """A verifier: proves, per example, that no perturbation in the ball changes the prediction.
    It is a lower bound beside the attacks' upper bound, so it runs on the same clean-correct
    examples, once per defense and Lp threat model of ``norms``."""

    id: str
    factory: Callable[..., Any] | str
    norms: tuple[str, ...] = VERIFIER_NORMS
    certifies: str = "model"
    """``model``: the deployed model itself (an attack that breaks a certified example contradicts
    it); ``smoothed``: the smoothed classifier g that a randomized defense's Monte-Carlo vote only
    approximates, with probability 1 - alpha (a broken vote can disagree with g by chance)."""
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    dataset_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    description: str = ""
    source: str = "builtin"

    def __post_init__(self) -> None:
        self._validate_common("verifier")
        object.__setattr__(self, "norms", tuple(self.norms))
        if not self.norms:
            raise RobustMatrixError(f"{self.id}: a verifier must certify at least one norm")
        for norm in self.norms:
            check_choice(norm, VERIFIER_NORMS, f"{self.id} norm")
        check_choice(self.certifies, ("model", "smoothed"), f"{self.id} certifies")

    def validate(self, dataset: str | None, kwargs: Mapping[str, Any] | None = None) -> None:
        """Build the verifier from resolved ``kwargs`` (cheap: nothing is verified)."""
        self._check_construction(f"verifier {self.id}", dataset, kwargs, {})

    def describe(self, dataset: str = "digits") -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": "verifier",
            "description": self.description,
            "source": self.source,
            "norms": list(self.norms),
            "certifies": self.certifies,
            "kwargs": self.resolve_kwargs(dataset),
            "kwargs_from": dataset_table(self.dataset_kwargs, dataset)[1],
            "dataset_kwargs": {k: dict(v) for k, v in self.dataset_kwargs.items()},
        }


Spec = DefenseSpec | AttackSpec | VerifierSpec


def spec_json(spec: Spec, kwargs: Mapping[str, Any]) -> str:
    """A canonical JSON of a spec with resolved kwargs, for the database."""
    payload = spec.describe()
    payload["kwargs"] = dict(kwargs)
    payload["factory"] = spec.factory_name()
    return json.dumps(payload, sort_keys=True)
