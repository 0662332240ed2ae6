"""Shared fixtures: the digits data, small trained defenses, the shared MNIST files, and CLI runners.

Nothing here downloads: tests that need ``../shared`` skip with the reason where it is absent.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bench.foundation.plugins import load_builtins

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"

load_builtins()

# Runs in tests use the in-process executor (fast to start, and it sees components that tests register
# in this process); tests/test_executor_pool.py runs the worker pool itself.
os.environ.setdefault("ROBUSTMATRIX_WORKERS", "1")
# The suite compares databases bit for bit and pins expected numbers: on a GPU host `--device auto`
# would run it on CUDA. Every command (in process or a subprocess) defaults to the CPU; GPU tests
# pass `--device cuda` and are marked `gpu` (skipped without CUDA, see pytest_collection_modifyitems).
os.environ["ROBUSTMATRIX_DEVICE"] = "cpu"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need a CUDA device: skipped, with the reason, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not "gpu" in keywords: a parameter id may say gpu
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach the network: every download attempt fails as if offline."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr("urllib.request.urlopen", refuse)


@pytest.fixture(scope="session")
def digits():
    from bench.foundation.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def shared_mnist_dir() -> Path:
    needed = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    if not all((SHARED_MNIST / name).exists() for name in needed):
        pytest.skip(f"the shared MNIST test set is not at {SHARED_MNIST} (it is in CI, not in a user's clone)")
    return SHARED_MNIST


@dataclass
class Trained:
    defense_id: str
    model: torch.nn.Module
    deployed: torch.nn.Module


def train_defense(defense_id: str, dataset, epochs: int = 8, seed: int = 0, **overrides) -> Trained:
    """Train a registered defense on a dataset with a short budget (for tests)."""
    from bench.foundation.models import build_model
    from bench.foundation.registry import DEFENSES
    from defenses.base import TrainContext, TrainData

    torch.manual_seed(seed)
    defense = DEFENSES.get(defense_id).make(dataset.name, {"epochs": epochs, **overrides})
    model = defense.build_model(build_model(dataset.name, dataset.image_shape, dataset.num_classes))
    defense.fit(
        model,
        TrainData(dataset.x_train, dataset.y_train, dataset.num_classes, dataset.name),
        TrainContext(torch.device("cpu"), seed),
    )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return Trained(defense_id, model, defense.deploy(model))


@pytest.fixture(scope="session")
def standard_digits(digits) -> Trained:
    return train_defense("standard-v1", digits, epochs=10)


@pytest.fixture(scope="session")
def eval_batch(digits):
    index = digits.eval_indices(200)
    return digits.x_test[index], digits.y_test[index]


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: Path | None = None) -> CliResult:
    """Run ``robustmatrix`` in-process (fast); cwd matters for default paths."""
    from bench.commands.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(previous)
    return CliResult(code, out.getvalue(), err.getvalue())


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.commands.cli", *args]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # A subprocess is out of reach of the in-process download guard: pip and the data loaders stay offline.
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env["ROBUSTMATRIX_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def run_cli_subprocess(*args: str, cwd: Path, timeout: float = 600, **env: str) -> CliResult:
    """Run ``robustmatrix`` as a real process (for kill/resume tests and exact exit behaviour)."""
    proc = subprocess.run(
        cli_command(*args), cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=timeout
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def write_matrix(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY_MATRIX = """
dataset = "digits"
defenses = ["standard-v1", "pgd-at-linf-v1"]
attacks = ["fgsm-linf-v1", "pgd-linf-v1"]
seeds = [0]
n_eval = 60
[eps]
linf = [0.1, 0.3]
[defense_kwargs."*"]
epochs = 2
[attack_kwargs."pgd-linf-v1"]
steps = 5
"""
