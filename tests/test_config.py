"""The matrix spec: a user's file is laid over its preset table by table, not replacing them."""

from __future__ import annotations

import pytest

from bench.foundation.config import load_spec, preset, spec_from_mapping
from bench.foundation.errors import RobustMatrixError
from tests.conftest import write_matrix


def test_quick_with_a_config_keeps_the_quick_settings(tmp_path):
    config = write_matrix(
        tmp_path / "m.toml",
        """
        [defense_kwargs."pgd-at-linf-v1"]
        eps = 0.1
        [defense_kwargs."*"]
        batch_size = 64
        [attack_kwargs."cw-l2-v1"]
        steps = 5
        """.replace("\n        ", "\n"),
    )
    spec = load_spec(config, quick=True)
    assert spec.defense_kwargs["*"] == {"epochs": 6, "batch_size": 64}, "kwargs merge key by key"
    assert spec.defense_kwargs["pgd-at-linf-v1"] == {"eps": 0.1}
    assert spec.attack_kwargs["cw-l2-v1"] == {"search_steps": 3, "steps": 5}
    assert spec.attack_kwargs["hopskipjump-l2-v1"] == {"steps": 1}, "tables the file does not name are kept"
    assert spec.n_eval == 100 and dict(spec.eps) == {"linf": (0.2,), "l2": (1.0,)}


def test_a_user_table_overrides_the_preset_value_of_the_same_kwarg(tmp_path):
    config = write_matrix(tmp_path / "m.toml", '[defense_kwargs."*"]\nepochs = 2\n')
    assert load_spec(config, quick=True).defense_kwargs["*"] == {"epochs": 2}


def test_eps_replaces_only_the_norms_it_names_and_an_empty_list_drops_one(tmp_path):
    config = write_matrix(tmp_path / "m.toml", "[eps]\nlinf = [0.1, 0.3]\nl1 = []\nspatial = []\n")
    spec = load_spec(config)
    default = preset("default")
    assert dict(spec.eps) == {"linf": (0.1, 0.3), "l2": default.eps["l2"]}
    quick = load_spec(write_matrix(tmp_path / "q.toml", "[eps]\nl1 = [2.0]\n"), quick=True)
    assert dict(quick.eps) == {"linf": (0.2,), "l2": (1.0,), "l1": (2.0,)}


def test_dropping_every_norm_is_an_error(tmp_path):
    config = write_matrix(tmp_path / "m.toml", "[eps]\nlinf = []\nl2 = []\n")
    with pytest.raises(RobustMatrixError, match="drops every norm"):
        load_spec(config, quick=True)


def test_a_complete_matrix_is_taken_as_it_is():
    """A preset, or the config recorded with a run, has no base: its tables are not merged with defaults."""
    recorded = preset("quick").to_dict()
    recorded["eps"] = {"l2": [1.0]}
    recorded["defense_kwargs"] = {}
    spec = spec_from_mapping(recorded, "recorded run")
    assert dict(spec.eps) == {"l2": (1.0,)} and dict(spec.defense_kwargs) == {}
    with pytest.raises(RobustMatrixError, match="eps.l2 must be a non-empty list"):
        spec_from_mapping({"eps": {"l2": []}}, "recorded run")
