"""Train two small MNIST models *outside* robustmatrix, as a researcher would, and print the
``[pretrained]`` tables that evaluate them with the harness.

- ``mnist-pgd-at-v1``: PGD adversarial training (Madry et al. 2018) at Linf eps 0.3 — 5 steps of
  0.1 from a random start, eps ramped up over the first 2 epochs — on the MNIST net of Wong, Rice &
  Kolter 2020 (``mnist_net`` of ``fast_adversarial``, redefined here with their layer order so the
  state_dict has their keys). (FGSM with random start, their cheaper recipe, collapsed under
  PGD on this small training set in a first attempt: catastrophic overfitting.)
- ``mnist-plain-v1``: the same net, trained on clean images only — the undefended baseline, and the
  surrogate the transfer attacks craft their examples on.

Only the MNIST *test* files are at hand (``t10k-*``), so the models are trained on 9,000 of the
official 10,000 test images: exactly those that are *not* among the 1,000 examples the harness
evaluates (``n_eval = 1000`` of dataset ``mnist``: a fixed, class-balanced prefix of the test set,
``Dataset.eval_indices``). Training and evaluation images are disjoint; the script asserts it. The
harness is used here only to read the files and to name those 1,000 examples; the training is plain
PyTorch.

    python examples/pretrained/train_outside.py --data-dir ../shared/data/mnist

writes ``mnist-pgd-at.pt`` and ``mnist-plain.pt`` next to this file (``--out`` to change it) and
prints their sha256 and tables. About two minutes of one CPU core.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from bench.foundation.data import load_dataset

EPS = 0.3
N_EVAL = 1000
"""The harness's evaluation examples (the matrix's n_eval): never trained on."""


def mnist_net() -> nn.Sequential:
    """Wong et al.'s MNIST net: conv16 (4x4, stride 2) - conv32 (4x4, stride 2) - fc100 - fc10."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, step: float) -> torch.Tensor:
    """Linf PGD on the cross-entropy from a uniform random start, projected onto the eps-ball and [0, 1]."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def train(x: torch.Tensor, y: torch.Tensor, epochs: int, adversarial: bool, seed: int = 0) -> nn.Module:
    """Adam with a triangular (cyclic) learning rate peaking at 5e-3, batch 100, as Wong et al.;
    adversarial: PGD-5 examples, eps growing linearly to 0.3 over the first two epochs."""
    torch.manual_seed(seed)
    model = mnist_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    steps = epochs * (len(x) // 100)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 5e-3, total_steps=steps, anneal_strategy="linear")
    ramp, done = 2 * (len(x) // 100), 0
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x) - 99, 100):
            batch = order[start : start + 100]
            eps = EPS * min(1.0, (done + 1) / ramp)
            inputs = pgd(model, x[batch], y[batch], eps, 5, eps / 3) if adversarial else x[batch]
            done += 1
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), y[batch]).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def table(name: str, path: Path, sha256: str, clean: float, adversarial: bool) -> str:
    threat = '\ntrained_against = [{ norm = "linf", eps = 0.3, attack = "pgd" }]' if adversarial else ""
    what = "PGD-5 adversarial training at Linf 0.3" if adversarial else "clean training only"
    return (
        f'[pretrained."{name}"]\ndataset = "mnist"\narchitecture = "wong-mnist-net"\nweights = "{path.name}"\n'
        f'sha256 = "{sha256}"{threat}\nclean_accuracy = {clean:.4f}\n'
        f'description = "{what}, trained outside robustmatrix on the 9,000 MNIST test images it does not evaluate"\n'
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with the two t10k-*.gz files")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist", args.data_dir, download=False)
    held_out = data.eval_indices(N_EVAL)
    train_index = torch.ones(len(data.y_test), dtype=torch.bool)
    train_index[held_out] = False
    x, y = data.x_test[train_index], data.y_test[train_index]
    x_eval, y_eval = data.x_test[held_out], data.y_test[held_out]
    assert len(x) == 9000 and not set(held_out.tolist()) & set(train_index.nonzero().squeeze(1).tolist())
    tables = []
    for name, file, adversarial, epochs in (
        ("mnist-pgd-at-v1", "mnist-pgd-at.pt", True, args.epochs),
        ("mnist-plain-v1", "mnist-plain.pt", False, 3),
    ):
        start = time.perf_counter()
        model = train(x, y, epochs, adversarial)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            clean = float((model(x_eval).argmax(1) == y_eval).float().mean())
        # A quick check of the training, not the benchmark: PGD-20, step eps/4.
        robust = float((model(pgd(model, x_eval, y_eval, EPS, 20, EPS / 4)).argmax(1) == y_eval).float().mean())
        path = args.out / file
        torch.save(model.state_dict(), path)  # a plain state_dict; read back with weights_only=True
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        print(
            f"# {name}: {epochs} epochs in {seconds:.0f} s; on the 1,000 held-out images: clean {clean:.4f}, "
            f"PGD-20 Linf 0.3 {robust:.4f}; sha256 {sha256}"
        )
        tables.append(table(name, path, sha256, clean, adversarial))
    print("\n" + "\n".join(tables), end="")


if __name__ == "__main__":
    main()
