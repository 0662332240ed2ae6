"""The plugin passes robustmatrix's checks and its regularizer does what the paper says: a flatter
loss surface around the data, hence more PGD robustness than plain training at a small eps."""

import gradient_regularization.defense  # noqa: F401  (registers the defense)
import torch

from attacks.base import Victim, predict
from attacks.pgd import PGD
from bench.commands.check import FAIL, check_defense, train_on_slice
from bench.foundation.data import load_dataset
from bench.registry import DEFENSES, load_builtins


def test_passes_robustmatrix_check():
    load_builtins()
    findings = check_defense(DEFENSES.get("gradient-regularization-v1"), load_dataset("digits"), torch.device("cpu"))
    failures = [f"{f.check}: {f.evidence}" for f in findings if f.status == FAIL]
    assert not failures, failures


def test_regularization_flattens_input_gradients():
    load_builtins()
    data = load_dataset("digits")
    x, y = data.x_test[:200], data.y_test[:200]

    def gradient_norm(defense_id: str) -> float:
        _, model, _ = train_on_slice(DEFENSES.get(defense_id), data, torch.device("cpu"), seed=0)
        x_grad = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x_grad), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_grad)
        return float(grad.flatten(1).norm(dim=1).mean())

    assert gradient_norm("gradient-regularization-v1") < 0.75 * gradient_norm("standard-v1")


def test_more_robust_than_standard_at_a_small_eps():
    load_builtins()
    data = load_dataset("digits")
    index = data.eval_indices(200)
    x, y = data.x_test[index], data.y_test[index]

    def robust_accuracy(defense_id: str) -> float:
        _, model, _ = train_on_slice(DEFENSES.get(defense_id), data, torch.device("cpu"), seed=0)
        torch.manual_seed(0)
        x_adv = PGD(0.1)(Victim(model, 10), x, y)
        return float((predict(model, x_adv) == y).float().mean())

    assert robust_accuracy("gradient-regularization-v1") > robust_accuracy("standard-v1")
