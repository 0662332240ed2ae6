"""The registries of defenses and attacks: specs by id, looked up by id or wildcard, with "did you
mean" on a miss. Built-in components register themselves next to their code with
``@register_attack`` / ``@register_defense`` (the pattern of timm's ``@register_model``)."""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from bench.foundation.errors import RobustMatrixError
from bench.foundation.kwargs import is_wildcard
from bench.foundation.kwargs import variant as with_variant
from bench.foundation.specs import AttackSpec, DefenseSpec, Spec, VerifierSpec


class Registry:
    """Specs of one kind, by id. Duplicates are refused; misses name the closest ids."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._specs: dict[str, Spec] = {}
        self._source: str | None = None

    def register(self, spec: Spec) -> Spec:
        expected = {"defense": DefenseSpec, "attack": AttackSpec, "verifier": VerifierSpec}[self.kind]
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
        wildcard must match something. A reference evaluation (AutoAttack itself: slow, and an
        optional package) and a defense registered ``opt_in`` are opt-in: only a literal id or a
        wildcard that spells the start of its name (``autoattack-*``) selects them, never ``*``."""
        chosen: list[str] = []
        for pattern in patterns:
            if any(ch in pattern for ch in "*?["):
                prefix = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
                matched = [
                    i for i in self.ids(pattern) if not _opt_in(self._specs[i]) or (prefix and i.startswith(prefix))
                ]
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


def _opt_in(spec: Spec) -> bool:
    """Never selected by ``*``: a reference evaluation, or a defense registered ``opt_in``."""
    return getattr(spec, "family", None) == "reference" or bool(getattr(spec, "opt_in", False))


DEFENSES = Registry("defense")
ATTACKS = Registry("attack")
VERIFIERS = Registry("verifier")


def registry_for(kind: str) -> Registry:
    return {"defense": DEFENSES, "attack": ATTACKS, "verifier": VERIFIERS}[kind]


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


def register_defense(
    id: str, *, registry: Registry | None = None, variant: Mapping[str, Any] | None = None, **declared: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class or function decorator: register the decorated factory as defense ``id``. Its kwargs
    are the constructor's defaults (the one source), with ``variant`` as other defaults for this
    id and ``kwargs`` for parameters the signature leaves without one."""

    def wrap(factory: Callable[..., Any]) -> Callable[..., Any]:
        (DEFENSES if registry is None else registry).register(
            DefenseSpec(id=id, factory=with_variant(factory, variant), **declared)
        )
        return factory

    return wrap


def register_attack(
    id: str, *, registry: Registry | None = None, variant: Mapping[str, Any] | None = None, **declared: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class or function decorator: register the decorated factory as attack ``id``, its kwargs read
    from the constructor's signature. Use it several times on one class to register variants:
    ``variant={"norm": "l2"}`` gives this id other defaults, same code."""

    def wrap(factory: Callable[..., Any]) -> Callable[..., Any]:
        (ATTACKS if registry is None else registry).register(
            AttackSpec(id=id, factory=with_variant(factory, variant), **declared)
        )
        return factory

    return wrap


def register_verifier(
    id: str, *, registry: Registry | None = None, variant: Mapping[str, Any] | None = None, **declared: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class or function decorator: register the decorated factory as verifier ``id`` (its kwargs
    read from the constructor's signature), declaring the ``norms`` it certifies."""

    def wrap(factory: Callable[..., Any]) -> Callable[..., Any]:
        (VERIFIERS if registry is None else registry).register(
            VerifierSpec(id=id, factory=with_variant(factory, variant), **declared)
        )
        return factory

    return wrap


def describe_all(dataset: str = "digits") -> list[dict[str, Any]]:
    """Everything registered, as JSON-ready dicts (``robustmatrix list --json``)."""
    return [spec.describe(dataset) for registry in (DEFENSES, ATTACKS, VERIFIERS) for spec in registry]
