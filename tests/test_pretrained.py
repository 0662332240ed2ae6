"""Pretrained defenses: the [pretrained] table, and a model trained outside the harness evaluated
beside the others, each broken declaration a one-line failure of its own model only."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bench.foundation.architectures import build_architecture
from bench.foundation.config import PretrainedSpec, load_spec
from bench.foundation.data import load_dataset
from bench.foundation.errors import RobustMatrixError
from tests.conftest import run_cli, write_matrix

SHA = "0" * 64


def table(name: str = "ext-v1", **fields: object) -> str:
    values = {"dataset": '"digits"', "architecture": '"small-cnn-w16"', "weights": '"w.pt"', "sha256": f'"{SHA}"'}
    values.update({k: str(v) for k, v in fields.items()})
    return f'[pretrained."{name}"]\n' + "\n".join(f"{k} = {v}" for k, v in values.items() if v != "DROP") + "\n"


def test_a_declaration_is_parsed_and_paths_are_read_from_the_matrix_folder(tmp_path: Path) -> None:
    path = write_matrix(
        tmp_path / "m.toml",
        table(trained_against='[{ norm = "linf", eps = 0.3, attack = "fgsm-rs" }]', mean="[0.5]", std="[0.25]"),
    )
    spec = load_spec(path)
    model = spec.pretrained["ext-v1"]
    assert isinstance(model, PretrainedSpec)
    assert model.weights == str((tmp_path / "w.pt").resolve())
    assert model.trained_against == (("linf", 0.3, "fgsm-rs"),)
    assert (model.mean, model.std, model.differentiable) == ((0.5,), (0.25,), True)
    # The config recorded with the run parses back to the same declarations.
    from bench.foundation.config import spec_from_mapping

    assert spec_from_mapping(json.loads(json.dumps(spec.to_dict())), "recorded").pretrained == spec.pretrained


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sha256": "DROP"}, "pretrained ext-v1: 'sha256' is required"),
        ({"sha256": '"abc"'}, "pretrained ext-v1: 'sha256' must be 64 hex digits"),
        ({"colour": '"red"'}, "pretrained ext-v1: unknown key 'colour'"),
        ({"dataset": '"cifar10"'}, "pretrained ext-v1 was trained on cifar10, but the matrix's dataset is digits"),
        ({"trained_against": '[{ norm = "l7", eps = 1, attack = "pgd" }]'}, "trained_against norm 'l7' is unknown"),
        ({"differentiable": "false"}, "must declare bpda_approximation"),
        ({"input_range": "[1, 0]"}, "'input_range' must be [low, high]"),
        ({"clean_accuracy": "99"}, "'clean_accuracy' must be a fraction"),
    ],
)
def test_every_bad_field_is_one_line_naming_the_model(tmp_path: Path, fields: dict, message: str) -> None:
    path = write_matrix(tmp_path / "m.toml", table(**fields))
    with pytest.raises(RobustMatrixError) as caught:
        load_spec(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def _train_outside(path: Path) -> nn.Module:
    """A model trained without robustmatrix: plain PyTorch on the digits training split."""
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_architecture("small-cnn-w16", data.image_shape, data.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        F.cross_entropy(model(data.x_train), data.y_train).backward()
        optimizer.step()
    torch.save(model.state_dict(), path)
    return model


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_external_model_is_evaluated_and_broken_ones_fail_alone(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    _train_outside(good)
    wrong = tmp_path / "wrong.pt"
    torch.save(build_architecture("small-cnn-w32", (1, 8, 8), 10).state_dict(), wrong)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    (tmp_path / "probnet.py").write_text(
        "from torch import nn\n"
        "from bench.foundation.models import SmallCNN\n"
        "def net():\n    return nn.Sequential(SmallCNN(1, 8, 10, width=16), nn.Softmax(dim=1))\n"
    )
    probs = tmp_path / "probs.pt"

    torch.save({f"0.{k}": v for k, v in torch.load(good, weights_only=True).items()}, probs)
    threat = '[{ norm = "linf", eps = 0.1, attack = "pgd" }]'
    matrix = write_matrix(
        tmp_path / "m.toml",
        'dataset = "digits"\ndefenses = []\nattacks = ["fgsm-linf-v1"]\nn_eval = 40\n[eps]\nlinf = [0.1, 0.3]\n'
        + table("ext-good-v1", weights='"good.pt"', sha256=f'"{_sha(good)}"', trained_against=threat)
        + table("ext-digest-v1", weights='"good.pt"')
        + table("ext-mismatch-v1", weights='"wrong.pt"', sha256=f'"{_sha(wrong)}"')
        + table("ext-junk-v1", weights='"junk.pt"', sha256=f'"{_sha(junk)}"')
        + table("ext-probs-v1", architecture='"probnet:net"', weights='"probs.pt"', sha256=f'"{_sha(probs)}"')
        + table("ext-nomodule-v1", architecture='"no_such_module:net"', weights='"good.pt"', sha256=f'"{_sha(good)}"'),
    )
    db, out = tmp_path / "r.db", tmp_path / "out"
    result = run_cli("run", "--config", str(matrix), "--db", str(db), "--out", str(out), "--workers", "1", "--quiet")
    assert result.code == 1, result.stderr
    failures = {
        line.split(":")[0].strip(): line for line in result.stderr.splitlines() if "none of its cells ran" in line
    }
    assert set(failures) == {f"ext-{n}-v1 (seed 0)" for n in ("digest", "mismatch", "junk", "probs", "nomodule")}, (
        result.stderr
    )
    assert (
        "sha256 of" in failures["ext-digest-v1 (seed 0)"]
        and "not the declared 0000" in failures["ext-digest-v1 (seed 0)"]
    )
    assert "does not fit architecture 'small-cnn-w16'" in failures["ext-mismatch-v1 (seed 0)"]
    assert "is not a checkpoint" in failures["ext-junk-v1 (seed 0)"]
    assert "outputs probabilities" in failures["ext-probs-v1 (seed 0)"]
    assert "cannot import architecture 'no_such_module:net'" in failures["ext-nomodule-v1 (seed 0)"]
    report = json.loads((out / "leaderboard.json").read_text())
    (row,) = report["datasets"][0]["defenses"]
    assert row["defense"] == "ext-good-v1"
    assert row["source"] == f"pretrained sha256:{_sha(good)[:12]}"
    assert row["training"]["epochs"] == 0
    assert {(t["eps"], t["seen"]) for t in row["worst_case_by_threat"]} == {(0.1, True), (0.3, False)}
    assert row["clean"]["value"] > 0.8  # the weights were loaded, not a fresh initialisation


def test_worker_processes_register_the_declarations_too(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    torch.save(build_architecture("small-cnn-w16", (1, 8, 8), 10).state_dict(), weights)
    matrix = write_matrix(
        tmp_path / "m.toml",
        'dataset = "digits"\ndefenses = []\nattacks = ["fgsm-linf-v1"]\nn_eval = 20\n[eps]\nlinf = [0.1]\n'
        + table("ext-v1", weights='"w.pt"', sha256=f'"{_sha(weights)}"'),
    )
    db, out = tmp_path / "r.db", tmp_path / "out"
    result = run_cli("run", "--config", str(matrix), "--db", str(db), "--out", str(out), "--workers", "2", "--quiet")
    assert result.code == 0, result.stderr
    assert "0 defenses trained, 1 cells computed" in result.stderr and "(1 pretrained models loaded)" in result.stderr
