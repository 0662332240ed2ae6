"""`robustmatrix check` on a model trained elsewhere: what needs no training, the clean accuracy next
to the claimed one, and each broken declaration a one-line failure naming the model (exit 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.foundation.architectures import build_architecture
from tests.conftest import run_cli, write_matrix
from tests.test_pretrained import _sha, _train_outside, table

HEAD = 'dataset = "digits"\ndefenses = []\nattacks = ["fgsm-linf-v1"]\nn_eval = 100\n[eps]\nlinf = [0.1]\n'


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "good.pt"
    _train_outside(path)
    return path


def _matrix(folder: Path, *tables: str) -> Path:
    return write_matrix(folder / "m.toml", HEAD + "".join(tables))


def _findings(stdout: str) -> dict[str, str]:
    """check's table: the check's name -> its status line."""
    return {line.split("  ")[0]: line for line in stdout.splitlines() if line[:4] in ("PASS", "WARN", "FAIL")}


def test_check_a_pretrained_model_prints_its_clean_accuracy_next_to_the_claim(tmp_path: Path, good: Path) -> None:
    import shutil

    shutil.copy(good, tmp_path / "good.pt")
    weights = f'"{_sha(good)}"'
    matrix = _matrix(
        tmp_path,
        table("ext-v1", weights='"good.pt"', sha256=weights),
        table("ext-claimed-v1", weights='"good.pt"', sha256=weights, clean_accuracy="0.5"),
    )
    result = run_cli("check", "--config", str(matrix), "ext-v1")
    assert result.code == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("robustmatrix check ext-v1 (pretrained sha256:") and "on digits" in lines[0]
    passed = [line.split()[1:4] for line in lines if line.startswith("PASS")]
    assert len(passed) == 8 and "builds and trains" not in result.stdout  # nothing is trained
    for name in ("weights match the declared sha256", "outputs are logits", "deterministic unless declared"):
        assert name in result.stdout
    assert "on the first 100 evaluation examples of digits's test split; no clean_accuracy declared" in result.stdout
    measured = float(result.stdout.split("clean accuracy as claimed")[1].split()[0])
    assert measured > 0.8
    # A claim far from the measurement is a failure that says so; the model's own run is unaffected.
    claimed = run_cli("check", "--config", str(matrix), "ext-claimed-v1", "--n-eval", "450")
    assert claimed.code == 1
    line = _findings(claimed.stdout)["FAIL"]
    assert "clean accuracy as claimed" in line and "declared 0.5000" in line and "a big gap" in line
    assert "on the first 450 evaluation examples" in line


def test_a_randomized_model_that_does_not_declare_it_fails_determinism(tmp_path: Path, good: Path) -> None:
    (tmp_path / "noisy.py").write_text(
        "import torch\nfrom torch import nn\nfrom bench.foundation.models import SmallCNN\n"
        "class Noisy(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.net = SmallCNN(1, 8, 10, width=16)\n"
        "    def forward(self, x):\n        return self.net(x + 0.1 * torch.randn_like(x))\n"
    )
    weights = tmp_path / "noisy.pt"
    torch.save({f"net.{k}": v for k, v in torch.load(good, weights_only=True).items()}, weights)
    matrix = _matrix(tmp_path, table("ext-noisy-v1", architecture='"noisy:Noisy"', weights='"noisy.pt"',
                                     sha256=f'"{_sha(weights)}"'))  # fmt: skip
    result = run_cli("check", "--config", str(matrix), "ext-noisy-v1")
    assert result.code == 1
    assert "FAIL  deterministic unless declared randomized" in result.stdout
    assert "does not declare randomized=True" in result.stdout


@pytest.mark.parametrize("broken", ["digest", "mismatch", "probs", "nomodule"])
def test_each_broken_declaration_is_one_failure_line_naming_the_model(tmp_path: Path, good: Path, broken: str) -> None:
    import shutil

    shutil.copy(good, tmp_path / "good.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save(build_architecture("small-cnn-w32", (1, 8, 8), 10).state_dict(), wrong)
    (tmp_path / "probnet.py").write_text(
        "from torch import nn\nfrom bench.foundation.models import SmallCNN\n"
        "def net():\n    return nn.Sequential(SmallCNN(1, 8, 10, width=16), nn.Softmax(dim=1))\n"
    )
    probs = tmp_path / "probs.pt"
    torch.save({f"0.{k}": v for k, v in torch.load(good, weights_only=True).items()}, probs)
    tables = {
        "digest": table("ext-digest-v1", weights='"good.pt"'),
        "mismatch": table("ext-mismatch-v1", weights='"wrong.pt"', sha256=f'"{_sha(wrong)}"'),
        "probs": table("ext-probs-v1", architecture='"probnet:net"', weights='"probs.pt"', sha256=f'"{_sha(probs)}"'),
        "nomodule": table("ext-nomodule-v1", architecture='"no_such_module:net"', weights='"good.pt"',
                          sha256=f'"{_sha(good)}"'),
    }  # fmt: skip
    expected = {
        "digest": ("weights match the declared sha256", "not the declared 0000"),
        "mismatch": ("weights load into the architecture", "does not fit architecture 'small-cnn-w16'"),
        "probs": ("outputs are logits", "outputs probabilities (rows in [0, 1] summing to 1), not logits"),
        "nomodule": ("weights load into the architecture", "cannot import architecture 'no_such_module:net'"),
    }[broken]
    matrix = _matrix(tmp_path, tables[broken])
    result = run_cli("check", "--config", str(matrix), f"ext-{broken}-v1")  # main(), as the entry point runs it
    assert result.code == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL ")]
    assert len(failed) == 1, result.stdout
    assert expected[0] in failed[0] and expected[1] in failed[0] and f"pretrained ext-{broken}-v1: " in failed[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_check_names_an_unknown_model_in_one_line(tmp_path: Path) -> None:
    matrix = _matrix(tmp_path, table("ext-v1"))
    result = run_cli("check", "--config", str(matrix), "ext-v2")
    assert result.code == 2 and "unknown" in result.stderr and "ext-v1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
