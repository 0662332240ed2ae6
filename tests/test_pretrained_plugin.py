"""A plugin shipping a model: a package whose ``robustmatrix.pretrained`` entry point declares
weights inside the package. It is loaded like any plugin (a broken one named and skipped), listed,
checked and evaluated by a matrix that selects it."""

from __future__ import annotations

import hashlib
import sqlite3
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bench.foundation.architectures import build_architecture
from bench.foundation.plugins import PRETRAINED_MODELS, load_plugins
from bench.foundation.registry import DEFENSES
from tests.conftest import run_cli, write_matrix


def _package(root: Path, name: str, source: str, files: dict[str, bytes] | None = None) -> None:
    """A real, minimal installed distribution: a package (with its files) and its .dist-info."""
    package = name.replace("-", "_")
    (root / package).mkdir()
    (root / package / "__init__.py").write_text(textwrap.dedent(source))
    for file, data in (files or {}).items():
        (root / package / file).write_bytes(data)
    info = root / f"{package}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[robustmatrix.pretrained]\nmodels = {package}:MODELS\n")


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    import io

    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(build_architecture("small-cnn-w16", (1, 8, 8), 10).state_dict(), buffer)
    weights = buffer.getvalue()
    sha = hashlib.sha256(weights).hexdigest()
    _package(
        tmp_path,
        "rm-model-plugin",
        f"""
        MODELS = {{
            "plugin-model-v1": {{
                "dataset": "digits", "architecture": "small-cnn-w16", "weights": "net.pt", "sha256": "{sha}",
                "trained_against": [{{"norm": "linf", "eps": 0.1, "attack": "pgd"}}],
            }}
        }}
        """,
        {"net.pt": weights},
    )
    _package(tmp_path, "rm-broken-model", 'MODELS = {"plugin-broken-v1": {"dataset": "digits"}}\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path, sha
    for name in ("plugin-model-v1", "plugin-broken-v1"):
        PRETRAINED_MODELS.pop(name, None)
        DEFENSES.unregister(name)
    for module in ("rm_model_plugin", "rm_broken_model"):
        sys.modules.pop(module, None)


def test_a_plugin_ships_a_model_and_a_broken_one_is_named_and_skipped(shipped) -> None:  # noqa: ANN001
    root, sha = shipped
    failures = load_plugins(("pretrained",))
    model = PRETRAINED_MODELS["plugin-model-v1"]
    assert model.distribution == "rm-model-plugin==0.3" and model.sha256 == sha
    assert Path(model.weights) == (root / "rm_model_plugin" / "net.pt").resolve()  # read from the package
    assert "plugin-model-v1" not in DEFENSES, "a shipped model joins a matrix only when one selects it"
    (failure,) = failures
    assert failure.message().startswith("pretrained plugin 'models' from rm-broken-model==0.3 failed to load: ")
    assert "pretrained plugin-broken-v1: 'architecture' is required" in failure.message()
    assert load_plugins(("pretrained",)) == [failure]  # loading again is idempotent


def test_a_shipped_model_is_listed_checked_and_evaluated(shipped, tmp_path: Path) -> None:  # noqa: ANN001
    _, sha = shipped
    listed = run_cli("list", "plugin-model-*")
    assert listed.code == 0 and "rm-broken-model==0.3 failed to load" in listed.stderr
    (line,) = [line for line in listed.stdout.splitlines() if line.startswith("plugin-model-v1")]
    assert sha[:12] in line and "rm-model-plugin==0.3" in line and "small-cnn-w16" in line
    checked = run_cli("check", "plugin-model-v1")
    assert "PASS  weights match the declared sha256" in checked.stdout, checked.stdout
    assert "FAIL  weights" not in checked.stdout
    matrix = write_matrix(
        tmp_path / "m.toml",
        'dataset = "digits"\ndefenses = ["plugin-*"]\nattacks = ["fgsm-linf-v1"]\nn_eval = 20\n[eps]\nlinf = [0.1]\n',
    )
    db = tmp_path / "r.db"
    ran = run_cli("run", "--config", str(matrix), "--db", str(db), "--out", str(tmp_path / "out"), "--quiet")
    assert ran.code == 0, ran.stderr
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT defense_id, source, epochs FROM trainings").fetchall()
    assert rows == [("plugin-model-v1", f"pretrained sha256:{sha[:12]} from rm-model-plugin==0.3", 0)]
