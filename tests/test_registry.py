"""Registry behaviour users rely on: clear errors, wildcards, declared properties, plugins."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from bench.errors import RobustMatrixError
from bench.registry import (
    ATTACKS,
    DEFENSES,
    AttackSpec,
    DefenseSpec,
    Registry,
    TrainingThreat,
    code_version,
    load_plugins,
)


def _attack(spec_id: str, **extra) -> AttackSpec:
    return AttackSpec(id=spec_id, factory="attacks.pgd:PGD", family="gradient", norm="linf", **extra)


def test_duplicate_id_is_refused():
    registry = Registry("attack")
    registry.register(_attack("pgd-linf-v1"))
    with pytest.raises(RobustMatrixError, match="already registered"):
        registry.register(_attack("pgd-linf-v1"))


def test_unknown_id_names_the_closest_ids():
    with pytest.raises(RobustMatrixError, match=r"unknown attack 'pgd-lnf-v1'; did you mean pgd-linf-v1"):
        ATTACKS.get("pgd-lnf-v1")
    with pytest.raises(RobustMatrixError, match="did you mean standard-v1"):
        DEFENSES.get("standard")


def test_listing_supports_wildcards_and_exclusions():
    registry = Registry("attack")
    for spec_id in ("pgd-linf-v1", "pgd-l2-v1", "fgsm-linf-v1"):
        registry.register(_attack(spec_id))
    assert registry.ids("pgd-*") == ["pgd-l2-v1", "pgd-linf-v1"]
    assert registry.ids("*-linf-*", exclude="fgsm*") == ["pgd-linf-v1"]
    assert [s.id for s in registry.select(["fgsm-linf-v1", "pgd-*"])] == ["fgsm-linf-v1", "pgd-l2-v1", "pgd-linf-v1"]
    with pytest.raises(RobustMatrixError, match="no attack matches 'cw-\\*'"):
        registry.select(["cw-*"])


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"id": "PGD"}, "version suffix"),
        ({"id": "pgd-v1", "family": "magic"}, "family must be one of"),
        ({"id": "pgd-v1", "norm": "l3"}, "norm must be one of"),
        ({"id": "pgd-v1", "kwargs": {"steps": float("nan")}}, "finite"),
        ({"id": "pgd-v1", "kwargs": {"model": object()}}, "not JSON-serializable"),
        ({"id": "pgd-v1", "eps_grid": ("0.1",)}, "must be a number"),
    ],
)
def test_attack_spec_validation(bad, message):
    fields = {"id": "pgd-v1", "factory": "attacks.pgd:PGD", "family": "gradient", "norm": "linf", **bad}
    with pytest.raises(RobustMatrixError, match=message):
        AttackSpec(**fields)


def test_defense_spec_validation():
    with pytest.raises(RobustMatrixError, match="not among its kwargs"):
        DefenseSpec(id="d-v1", factory=dict, trained_against=(TrainingThreat("linf", "pgd"),))
    with pytest.raises(RobustMatrixError, match="must declare bpda_approximation"):
        DefenseSpec(id="d-v1", factory=dict, differentiable=False)


def test_specs_are_frozen():
    spec = DEFENSES.get("standard-v1")
    with pytest.raises(AttributeError):
        spec.randomized = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.kwargs["epochs"] = 1  # type: ignore[index]


def test_kwargs_resolve_dataset_defaults_then_overrides():
    spec = DEFENSES.get("pgd-at-linf-v1")
    assert spec.resolve_kwargs("digits")["eps"] == 0.2
    assert spec.resolve_kwargs("mnist")["eps"] == 0.3
    assert spec.resolve_kwargs("mnist", {"eps": 0.1})["eps"] == 0.1
    with pytest.raises(RobustMatrixError, match="unknown kwarg 'epsilon'"):
        spec.resolve_kwargs("digits", {"epsilon": 0.1})


def test_defense_declares_what_it_was_trained_against():
    spec = DEFENSES.get("pgd-at-linf-v1")
    (threat,) = spec.threat_models(spec.resolve_kwargs("digits"))
    assert (threat.norm, threat.eps, threat.attack) == ("linf", 0.2, "pgd")
    described = spec.describe("cifar10")
    assert described["trained_against"][0]["eps"] == pytest.approx(8 / 255)
    assert described["randomized"] is False and described["differentiable"] is True


def test_code_version_follows_the_source(tmp_path, monkeypatch):
    module = tmp_path / "versioned_component.py"
    module.write_text("def make(**kwargs):\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = code_version("versioned_component:make", "x-v1")
    assert first == code_version("versioned_component:make", "x-v1")
    del sys.modules["versioned_component"]
    module.write_text("def make(**kwargs):\n    return 2\n")
    assert code_version("versioned_component:make", "x-v1") != first


def _write_distribution(root: Path, name: str, group: str, entry: str, module_source: str) -> None:
    """A real, minimal installed distribution: a module plus its .dist-info with entry points."""
    package = name.replace("-", "_")
    (root / f"{package}.py").write_text(textwrap.dedent(module_source))
    info = root / f"{package}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{entry} = {package}:{entry}\n")


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for spec_id in ("plugin-noise-v1", "plugin-extra-v1"):
        ATTACKS.unregister(spec_id)
        DEFENSES.unregister(spec_id)
    for name in ("rm_good_plugin", "rm_broken_plugin"):
        sys.modules.pop(name, None)


def test_plugins_load_from_entry_points_and_a_broken_one_is_named(plugin_path):
    _write_distribution(
        plugin_path,
        "rm-good-plugin",
        "robustmatrix.defenses",
        "SPEC",
        """
        from bench.registry import DefenseSpec
        SPEC = DefenseSpec(id="plugin-noise-v1", factory="defenses.standard:Standard", description="plugin")
        """,
    )
    _write_distribution(
        plugin_path,
        "rm-broken-plugin",
        "robustmatrix.defenses",
        "SPEC",
        "import a_module_that_does_not_exist\n",
    )
    assert "plugin-noise-v1" not in DEFENSES, "plugins must not load on import"
    failures = load_plugins(("defense",))
    assert "plugin-noise-v1" in DEFENSES
    assert DEFENSES.get("plugin-noise-v1").source == "rm-good-plugin==0.3"
    assert len(failures) == 1
    message = failures[0].message()
    assert "rm-broken-plugin==0.3" in message and "a_module_that_does_not_exist" in message


def test_cli_lists_plugins_and_reports_broken_ones(plugin_path):
    from tests.conftest import run_cli

    _write_distribution(
        plugin_path,
        "rm-good-plugin",
        "robustmatrix.attacks",
        "SPEC",
        """
        from bench.registry import AttackSpec
        SPEC = AttackSpec(id="plugin-extra-v1", factory="attacks.fgsm:FGSM", family="gradient", norm="linf")
        """,
    )
    _write_distribution(plugin_path, "rm-broken-plugin", "robustmatrix.attacks", "SPEC", "raise RuntimeError('boom')\n")
    result = run_cli("list", "--json", "--kind", "attack", "plugin-*")
    assert result.code == 0
    assert '"plugin-extra-v1"' in result.stdout
    assert "rm-broken-plugin==0.3 failed to load: RuntimeError: boom" in result.stderr
    assert "Traceback" not in result.stderr
