"""The public API for plugins: everything a defense or attack package needs to register itself.

Plugins import from here (``from bench.registry import register_defense, TrainingThreat``); the
names live in ``bench.foundation`` (specs, registry, plugins), and this module keeps them where
plugins written against earlier releases look for them.
"""

from bench.foundation.errors import RobustMatrixError
from bench.foundation.plugins import PluginFailure, load_builtins, load_plugins
from bench.foundation.registry import (
    ATTACKS,
    DEFENSES,
    VERIFIERS,
    Registry,
    closest_ids,
    describe_all,
    register_attack,
    register_defense,
    register_verifier,
    registry_for,
    unknown_id_message,
)
from bench.foundation.specs import (
    FAMILIES,
    NORMS,
    TRIGGERS,
    AttackSpec,
    Budget,
    DefenseSpec,
    ThreatModel,
    TrainedAgainst,
    TrainingThreat,
    VerifierSpec,
    spec_json,
)

__all__ = [
    "ATTACKS",
    "DEFENSES",
    "FAMILIES",
    "NORMS",
    "TRIGGERS",
    "AttackSpec",
    "Budget",
    "DefenseSpec",
    "PluginFailure",
    "Registry",
    "RobustMatrixError",
    "ThreatModel",
    "TrainedAgainst",
    "TrainingThreat",
    "VERIFIERS",
    "VerifierSpec",
    "closest_ids",
    "describe_all",
    "load_builtins",
    "load_plugins",
    "register_attack",
    "register_defense",
    "register_verifier",
    "registry_for",
    "spec_json",
    "unknown_id_message",
]
