"""``training_precision = "bf16"``: trainings under bfloat16 autocast, keyed apart from fp32 ones;
fp32 (the default) keeps every earlier key; attacks never run in bf16."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bench.execution.jobs import TrainingJob
from bench.execution.runner import Runner
from bench.execution.workbench import Workbench, training_precision
from bench.foundation.config import MatrixSpec, spec_from_mapping
from bench.foundation.errors import RobustMatrixError
from bench.foundation.keys import RESULTS_VERSION, digest, keyed_versions
from bench.foundation.models import architecture_name
from bench.foundation.registry import DEFENSES

SPEC = MatrixSpec(defenses=("standard-v1", "pgd-at-linf-v1"), attacks=("fgsm-linf-v1",), n_eval=20)


def test_bf16_changes_the_training_key_and_fp32_keeps_the_old_one(digits):
    fp32 = Runner(SPEC, digits, None)
    bf16 = Runner(replace(SPEC, training_precision="bf16"), digits, None)
    defense = DEFENSES.get("pgd-at-linf-v1")
    old, new = fp32.training_job(defense, 0), bf16.training_job(defense, 0)
    assert new.training_key != old.training_key and new.precision == "bf16" and old.precision == "fp32"
    # fp32's key is the payload every earlier run digested, without a precision in it.
    import inspect

    import bench.foundation.models

    expected = digest(
        {
            "defense": defense.id,
            "version": defense.code_version(),
            "kwargs": old.kwargs,
            "dataset": "digits",
            "data": digits.fingerprint(),
            "seed": 0,
            "architecture": architecture_name("digits"),
            "models": digest(inspect.getsource(bench.foundation.models)),
            "libraries": keyed_versions(),
            "environment": fp32.environment,
            "harness": RESULTS_VERSION,
        }
    )
    assert old.training_key == expected
    assert bf16.evaluation_job(new).eval_key != fp32.evaluation_job(old).eval_key


def test_training_precision_is_checked_when_the_matrix_is_read():
    assert spec_from_mapping({"training_precision": "bf16"}, "m.toml").training_precision == "bf16"
    with pytest.raises(RobustMatrixError, match="training_precision"):
        spec_from_mapping({"training_precision": "fp16"}, "m.toml")


def test_autocast_is_on_only_for_bf16():
    layer = torch.nn.Linear(4, 4)
    x = torch.rand(2, 4)
    with training_precision(torch.device("cpu"), "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with training_precision(torch.device("cpu"), "fp32"):
        assert layer(x).dtype == torch.float32


def test_a_bf16_training_runs_on_the_cpu(digits, tmp_path):
    """PGD-AT for one epoch (one PGD step, large batches: the test stays fast) in bf16: it trains,
    its weights stay fp32 and finite, and they are not the fp32 training's (autocast really was on)."""
    kwargs = DEFENSES.get("pgd-at-linf-v1").resolve_kwargs("digits", {"epochs": 1, "steps": 1, "batch_size": 512})
    bench = Workbench("digits", torch.device("cpu"), tmp_path)
    weights = {}
    for precision in ("fp32", "bf16"):
        job = TrainingJob("b" * 32, "pgd-at-linf-v1", kwargs, "digits", 0, f"{precision}.pt", precision=precision)
        record = bench.train(job)
        assert record.forwards > 0
        state = torch.load(tmp_path / job.checkpoint, weights_only=True)["state_dict"]
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())
        weights[precision] = state
    assert any(not torch.equal(weights["fp32"][k], weights["bf16"][k]) for k in weights["fp32"])


def test_evaluation_examples_go_to_the_device_once_per_n_eval(digits, tmp_path, monkeypatch):
    """Every cell of a worker reads the evaluation examples: copied once per n_eval, not per call."""
    bench = Workbench("digits", torch.device("cpu"), tmp_path)
    bench._data = digits
    calls = []
    original = type(digits).eval_indices
    monkeypatch.setattr(type(digits), "eval_indices", lambda self, n: calls.append(n) or original(self, n))
    first = bench.eval_set(30)
    assert bench.eval_set(30) is first and calls == [30]
    x, y = bench.eval_set(40)
    assert calls == [30, 40] and len(y) == 40 and torch.equal(x[:30], first[0])
