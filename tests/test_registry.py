"""Registry behaviour users rely on: clear errors, wildcards, declared properties, plugins."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from bench.foundation.errors import RobustMatrixError
from bench.foundation.kwargs import validate_kwarg_tables
from bench.foundation.plugins import load_plugins
from bench.foundation.registry import ATTACKS, DEFENSES, Registry, unknown_id_message
from bench.foundation.specs import AttackSpec, DefenseSpec, TrainingThreat
from bench.foundation.versioning import code_version


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
    for spec_id in ("plugin-noise-v1", "plugin-extra-v1", "plugin-stray-v1", "plugin-late-v1"):
        ATTACKS.unregister(spec_id)
        DEFENSES.unregister(spec_id)
    for name in ("rm_good_plugin", "rm_broken_plugin", "rm_exiting_plugin", "rm_mixed_plugin"):
        sys.modules.pop(name, None)


def test_plugins_load_from_entry_points_and_a_broken_one_is_named(plugin_path):
    _write_distribution(
        plugin_path,
        "rm-good-plugin",
        "robustmatrix.defenses",
        "SPEC",
        """
        from bench.foundation.specs import DefenseSpec
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
        from bench.foundation.specs import AttackSpec
        SPEC = AttackSpec(id="plugin-extra-v1", factory="attacks.fgsm:FGSM", family="gradient", norm="linf")
        """,
    )
    _write_distribution(plugin_path, "rm-broken-plugin", "robustmatrix.attacks", "SPEC", "raise RuntimeError('boom')\n")
    result = run_cli("list", "--json", "--kind", "attack", "plugin-*")
    assert result.code == 0
    assert '"plugin-extra-v1"' in result.stdout
    assert "rm-broken-plugin==0.3 failed to load: RuntimeError: boom" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ kwargs tables and values up front
def test_a_wildcard_kwarg_no_matched_component_has_is_an_error_naming_the_closest():
    everything = DEFENSES.select(["*"])
    with pytest.raises(RobustMatrixError, match=r"defense_kwargs.\"\*\": .*kwarg 'epoch'; did you mean epochs"):
        validate_kwarg_tables({"*": {"epoch": 1}}, DEFENSES, everything)
    # a kwarg only some matched components have is fine: it applies to those
    validate_kwarg_tables({"*": {"epochs": 1, "temperature": 50.0}}, DEFENSES, everything)


def test_a_wildcard_must_match_a_selected_component():
    with pytest.raises(RobustMatrixError, match=r"defense_kwargs.\"zz\*\" matches no defense"):
        validate_kwarg_tables({"zz*": {"epochs": 1}}, DEFENSES, DEFENSES.select(["*"]))
    only_standard = DEFENSES.select(["standard-v1"])
    with pytest.raises(RobustMatrixError, match="pgd-at-l2-v1, pgd-at-linf-v1, which the matrix does not select"):
        validate_kwarg_tables({"pgd-at-*": {"epochs": 1}}, DEFENSES, only_standard)


def test_literal_kwargs_tables_name_the_closest_id_and_kwarg():
    attacks = ATTACKS.select(["*"])
    with pytest.raises(RobustMatrixError, match="unknown attack 'pgd-lnf-v1'; did you mean pgd-linf-v1"):
        validate_kwarg_tables({"pgd-lnf-v1": {"steps": 1}}, ATTACKS, attacks)
    with pytest.raises(RobustMatrixError, match="unknown kwarg 'stepz' for pgd-linf-v1.*did you mean steps"):
        validate_kwarg_tables({"pgd-linf-v1": {"stepz": 1}}, ATTACKS, attacks)


def test_bad_kwarg_values_are_caught_before_any_work_naming_the_kwarg():
    defense = DEFENSES.get("pgd-at-linf-v1")
    with pytest.raises(RobustMatrixError, match=r"^defense pgd-at-linf-v1: kwarg epochs='three' is rejected: epochs"):
        defense.validate("digits", defense.resolve_kwargs("digits", {"epochs": "three"}))
    attack = ATTACKS.get("pgd-linf-v1")
    bad = attack.resolve_kwargs("digits", {"steps": 0, "loss": "foo"})
    with pytest.raises(RobustMatrixError) as caught:
        attack.validate("digits", bad, [0.1, 0.2])
    message = str(caught.value)
    assert message.startswith("attack pgd-linf-v1 at eps 0.1: kwarg steps=0 is rejected")
    assert "kwarg loss='foo' is rejected" in message and "\n" not in message


def test_every_builtin_validates_with_its_defaults_quickly():
    for spec in DEFENSES:
        spec.validate("digits")
    from attacks.autoattack_reference import autoattack_available

    for spec in ATTACKS:
        if spec.family == "reference" and not autoattack_available():
            with pytest.raises(RobustMatrixError, match="needs the reference autoattack package: pip install"):
                spec.validate("digits", None, [0.1])
            continue
        spec.validate("digits", None, spec.eps_grid or [0.1, 0.3])


def test_a_wildcard_never_selects_the_reference_evaluation_unless_it_spells_its_name():
    everything = [s.id for s in ATTACKS.select(["*"])]
    assert not [i for i in everything if i.startswith("autoattack-")]
    assert "autoattack-standard-linf-v1" not in [s.id for s in ATTACKS.select(["*-linf-v1"])]
    assert [s.id for s in ATTACKS.select(["autoattack-*"])] == [
        "autoattack-standard-l2-v1",
        "autoattack-standard-linf-v1",
    ]
    assert [s.id for s in ATTACKS.select(["autoattack-standard-l2-v1"])] == ["autoattack-standard-l2-v1"]


def test_unknown_ids_name_the_closest_of_both_registries():
    message = unknown_id_message("pgd-at-linf")
    assert message.startswith("unknown defense or attack 'pgd-at-linf'; did you mean pgd-at-linf-v1 (defense)")
    assert "(attack)" in unknown_id_message("pgd-lnf-v1")


def test_a_plugin_calling_sys_exit_is_named_and_the_others_still_load(plugin_path):
    from tests.conftest import run_cli

    _write_distribution(plugin_path, "rm-exiting-plugin", "robustmatrix.defenses", "SPEC", "import sys\nsys.exit(3)\n")
    _write_distribution(
        plugin_path,
        "rm-good-plugin",
        "robustmatrix.defenses",
        "SPEC",
        """
        from bench.foundation.specs import DefenseSpec
        SPEC = DefenseSpec(id="plugin-noise-v1", factory="defenses.standard:Standard")
        """,
    )
    result = run_cli("list", "--kind", "defense", "plugin-*")
    assert result.code == 0, result.stderr
    assert "plugin-noise-v1" in result.stdout
    assert "rm-exiting-plugin==0.3 failed to load: it called sys.exit(3) while loading" in result.stderr


def test_a_failed_plugin_leaves_nothing_behind_in_either_registry(plugin_path):
    _write_distribution(
        plugin_path,
        "rm-broken-plugin",
        "robustmatrix.defenses",
        "SPEC",
        """
        from bench.foundation.registry import ATTACKS
        from bench.foundation.specs import AttackSpec
        ATTACKS.register(AttackSpec(id="plugin-stray-v1", factory="attacks.fgsm:FGSM", family="gradient", norm="linf"))
        raise RuntimeError("half way")
        """,
    )
    failures = load_plugins(("defense",))
    assert [f.distribution for f in failures] == ["rm-broken-plugin==0.3"]
    assert "plugin-stray-v1" not in ATTACKS, "a failed plugin's attack must be rolled back"


def test_components_of_the_other_kind_are_attributed_to_the_plugin(plugin_path):
    _write_distribution(
        plugin_path,
        "rm-mixed-plugin",
        "robustmatrix.defenses",
        "SPEC",
        """
        from bench.foundation.registry import ATTACKS
        from bench.foundation.specs import AttackSpec, DefenseSpec
        ATTACKS.register(AttackSpec(id="plugin-late-v1", factory="attacks.fgsm:FGSM", family="gradient", norm="linf"))
        SPEC = DefenseSpec(id="plugin-noise-v1", factory="defenses.standard:Standard")
        """,
    )
    assert load_plugins(("defense",)) == []
    assert DEFENSES.get("plugin-noise-v1").source == "rm-mixed-plugin==0.3"
    assert ATTACKS.get("plugin-late-v1").source == "rm-mixed-plugin==0.3", "not labelled builtin"


def test_an_installed_plugin_written_against_the_published_api_still_loads(plugin_path):
    """Plugins import ``bench.registry`` (the scaffold, the example and the README say so); the
    layers moved the code underneath, not that name."""
    _write_distribution(
        plugin_path,
        "rm-mixed-plugin",
        "robustmatrix.attacks",
        "SPEC",
        """
        from bench.registry import ATTACKS, AttackSpec, Budget, register_attack, register_defense, TrainingThreat

        @register_defense("plugin-late-v1", kwargs={"epochs": 1, "eps": 0.1},
                          trained_against=(TrainingThreat("linf", "pgd"),))
        def make_defense(epochs, eps):
            from defenses.standard import Standard
            return Standard(epochs=epochs)

        @register_attack("plugin-extra-v1", family="gradient", norm="linf", kwargs={"steps": 3})
        def make_attack(eps, steps=3):
            from attacks.pgd import PGD
            return PGD(eps, steps=steps)

        SPEC = AttackSpec(id="plugin-stray-v1", factory="attacks.fgsm:FGSM", family="gradient", norm="linf",
                          budget_defaults=Budget(steps=1, restarts=1))
        """,
    )
    assert load_plugins(("attack",)) == []
    assert ATTACKS.get("plugin-extra-v1").kwargs == {"steps": 3}
    assert ATTACKS.get("plugin-stray-v1").kwargs == {}  # a 'module:attr' factory is read lazily, as declared
    assert DEFENSES.get("plugin-late-v1").resolve_kwargs("digits") == {"epochs": 1, "eps": 0.1}


def _builtin_specs():
    from bench.foundation.plugins import load_builtins

    load_builtins()
    return [*ATTACKS, *DEFENSES]


@pytest.mark.parametrize("spec", _builtin_specs(), ids=lambda spec: spec.id)
def test_every_builtin_declares_exactly_its_constructors_defaults(spec):
    from bench.foundation.kwargs import kwargs_drift

    assert kwargs_drift(spec.load(), spec.kwargs) == []


def test_a_declared_default_that_contradicts_the_constructor_is_named():
    from attacks.pgd import PGD
    from bench.foundation.kwargs import kwargs_drift

    spec = _attack("pgd-drifted-v1", kwargs={"steps": 40, "restarts": 1, "typo_kwarg": 1})
    drift = kwargs_drift(spec.load(), spec.kwargs)
    assert any("steps=40" in line and "default is 20" in line for line in drift)
    assert any("typo_kwarg is not a parameter" in line for line in drift)
    assert kwargs_drift(PGD, {"steps": 20}) == []
    # A variant's other defaults are defaults of the registered callable, not drift.
    registry = Registry("attack")
    from bench.foundation.registry import register_attack

    register_attack("pgd-l2-again-v1", registry=registry, family="gradient", norm="l2", variant={"norm": "l2"})(PGD)
    variant = registry.get("pgd-l2-again-v1")
    assert variant.kwargs["norm"] == "l2" and variant.kwargs["steps"] == 20
    assert kwargs_drift(variant.load(), variant.kwargs) == []
