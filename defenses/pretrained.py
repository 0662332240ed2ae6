"""A defense trained elsewhere: its "training" verifies the declared weights (sha256), loads them into
the declared architecture and checks that it answers with logits of the right shape; the workbench
then saves it as any trained checkpoint, so evaluation, cells, the leaderboard, flags and the
seen/unseen columns treat it exactly like a defense trained here.

Declared in the matrix (``[pretrained."ID"]``, ``bench.foundation.config.PretrainedSpec``) and
registered as a ``DefenseSpec`` by :func:`register_pretrained`, in the driver and in every worker.
The training key holds the weights' digest (not their path) and the architecture's code version.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.foundation.architectures import ARCHITECTURES, build_architecture
from bench.foundation.config import PretrainedSpec, dataset_family
from bench.foundation.errors import RobustMatrixError
from bench.foundation.registry import DEFENSES
from bench.foundation.specs import DefenseSpec, TrainingThreat
from bench.foundation.versioning import code_version
from defenses.base import Defense, TrainContext, TrainData

IMAGE_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
"""Image shape (C, H, W) per dataset family; every built-in dataset has 10 classes."""
NUM_CLASSES = 10


class Normalized(nn.Module):
    """The model's own input convention inside the deployed model, so attacks stay in [0, 1] pixel
    space: x -> low + x (high - low), then (x - mean) / std. Without any, exactly ``net(x)``."""

    def __init__(self, net: nn.Module, declaration: PretrainedSpec) -> None:
        super().__init__()
        self.net = net
        low, high = declaration.input_range or (0.0, 1.0)
        self.scale = declaration.input_range is not None
        self.low, self.high = low, high
        self.normalize = declaration.mean is not None or declaration.std is not None
        # Not in the state_dict: the checkpoint holds exactly the published weights under "net.".
        self.register_buffer("mean", torch.tensor(declaration.mean or (0.0,)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(declaration.std or (1.0,)).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale:
            x = self.low + x * (self.high - self.low)
        if self.normalize:
            x = (x - self.mean) / self.std
        return self.net(x)


def _fail(declaration: PretrainedSpec, message: str) -> RobustMatrixError:
    return RobustMatrixError(f"pretrained {declaration.id}: {message}")


def _architecture_factory(declaration: PretrainedSpec) -> Any:
    """The callable behind "module:callable", imported from the matrix file's folder too."""
    module_name, _, attr = declaration.architecture.partition(":")
    if declaration.base_dir and declaration.base_dir not in sys.path:
        sys.path.append(declaration.base_dir)
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # noqa: BLE001 - a missing or broken module is the model's problem, in one line
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _fail(declaration, f"cannot import architecture '{declaration.architecture}': {text}") from None
    return obj


def build_network(declaration: PretrainedSpec) -> nn.Module:
    """The declared architecture, untrained."""
    if declaration.architecture in ARCHITECTURES or ":" not in declaration.architecture:
        shape = IMAGE_SHAPES[dataset_family(declaration.dataset)]
        try:
            return build_architecture(declaration.architecture, shape, NUM_CLASSES)
        except RobustMatrixError as exc:
            raise _fail(declaration, str(exc)) from None
    factory = _architecture_factory(declaration)
    try:
        net = factory()
    except Exception as exc:  # noqa: BLE001
        raise _fail(
            declaration, f"architecture '{declaration.architecture}' raised {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(net, nn.Module):
        raise _fail(
            declaration, f"architecture '{declaration.architecture}' returned {type(net).__name__}, not an nn.Module"
        )
    return net


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(declaration: PretrainedSpec) -> dict[str, torch.Tensor]:
    """The verified weights: the file's sha256 must be the declared one; then a safetensors file, or
    a torch file read with ``weights_only=True`` (a ``{"state_dict": ...}`` wrapper and
    DataParallel's "module." prefix are unwrapped)."""
    path = Path(declaration.weights)
    if not path.is_file():
        raise _fail(declaration, f"weights file {path} does not exist")
    actual = file_sha256(path)
    if actual != declaration.sha256:
        raise _fail(
            declaration, f"sha256 of {path} is {actual}, not the declared {declaration.sha256}; nothing was run"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is "not a checkpoint"
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _fail(declaration, f"{path} is not a checkpoint ({type(exc).__name__}: {text[:200]})") from None
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _fail(declaration, f"{path} is not a state_dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_weights(net: nn.Module, state: dict[str, torch.Tensor], declaration: PretrainedSpec) -> None:
    """``load_state_dict`` with a one-line answer when the weights do not fit the architecture."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) ({', '.join(unexpected[:3])})")
        if shapes:
            k = shapes[0]
            parts.append(f"{k} has shape {tuple(state[k].shape)}, the architecture {tuple(expected[k].shape)}")
        raise _fail(
            declaration, f"the state_dict does not fit architecture '{declaration.architecture}': {'; '.join(parts)}"
        )
    net.load_state_dict(state)


def check_outputs(model: nn.Module, x: torch.Tensor, num_classes: int, declaration: PretrainedSpec) -> None:
    """Logits of shape (N, classes), finite, and not probabilities (attacks' losses need logits)."""
    with torch.no_grad():
        out = model.eval()(x)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(x), num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _fail(declaration, f"outputs {shape} for {len(x)} images, expected ({len(x)}, {num_classes}) logits")
    if not bool(torch.isfinite(out).all()):
        raise _fail(declaration, "outputs NaN/inf on clean test images")
    if bool(((out >= 0) & (out <= 1)).all()) and bool(torch.allclose(out.sum(1), torch.ones(len(x)), atol=1e-3)):
        raise _fail(declaration, "outputs probabilities (rows in [0, 1] summing to 1), not logits; remove the softmax")


class Pretrained(Defense):
    """Weights trained elsewhere; the kwargs exist only to key the checkpoint (digest, architecture
    and its code, normalisation, trained-against eps)."""

    needs_training_data = False
    """Its ``fit`` only loads and checks weights, on a few test images: a matrix of such models runs
    where only the test files are at hand (the workbench reads this)."""

    def __init__(self, declaration: PretrainedSpec, **keyed: Any) -> None:
        self.declaration = declaration

    def build_model(self, model: nn.Module) -> nn.Module:
        """The declared architecture replaces the benchmark's."""
        return Normalized(build_network(self.declaration), self.declaration)

    def fit(self, model: nn.Module, data: TrainData, ctx: TrainContext) -> None:
        assert isinstance(model, Normalized)
        load_weights(model.net, read_state_dict(self.declaration), self.declaration)
        model.to(ctx.device)
        check_outputs(model, data.x[:16], data.num_classes, self.declaration)


def _architecture_code(declaration: PretrainedSpec) -> str:
    """The code version of a "module:callable" architecture (a registered one is in the harness's
    key already); "unavailable" when it cannot be imported: its training then fails with the reason."""
    if declaration.architecture in ARCHITECTURES or ":" not in declaration.architecture:
        return "registered"
    try:
        return code_version(_architecture_factory(declaration), declaration.id)
    except RobustMatrixError:
        return "unavailable"


def pretrained_spec(declaration: PretrainedSpec) -> DefenseSpec:
    """The DefenseSpec of a declaration: source "pretrained sha256:<first 12>", its nature as declared."""
    eps = {f"trained_eps_{i}": eps for i, (_, eps, _) in enumerate(declaration.trained_against)}
    kwargs = {
        "sha256": declaration.sha256,
        "architecture": declaration.architecture,
        "architecture_code": _architecture_code(declaration),
        "input_range": list(declaration.input_range) if declaration.input_range else None,
        "mean": list(declaration.mean) if declaration.mean else None,
        "std": list(declaration.std) if declaration.std else None,
        **eps,
    }
    return DefenseSpec(
        id=declaration.id,
        factory=functools.partial(Pretrained, declaration),
        trained_against=tuple(
            TrainingThreat(norm, attack, eps_kwarg=f"trained_eps_{i}")
            for i, (norm, _, attack) in enumerate(declaration.trained_against)
        ),
        randomized=declaration.randomized,
        differentiable=declaration.differentiable,
        bpda_approximation=declaration.bpda_approximation,
        saturates_softmax=declaration.saturates_softmax,
        kwargs=kwargs,
        description=declaration.description or f"pretrained {declaration.architecture}",
        source=f"pretrained sha256:{declaration.sha256[:12]}"
        + (f" from {declaration.distribution}" if declaration.distribution else ""),
    )


def register_pretrained(declarations: Any) -> list[DefenseSpec]:
    """Register each declaration (idempotent; a redeclared pretrained id replaces its old spec, an id
    taken by another defense is refused)."""
    specs = []
    for declaration in declarations:
        spec = pretrained_spec(declaration)
        if declaration.id in DEFENSES:
            current = DEFENSES.get(declaration.id)
            if not current.source.startswith("pretrained"):
                raise _fail(declaration, f"the id is already registered by {current.source}; pick another id")
            DEFENSES.unregister(declaration.id)
        specs.append(DEFENSES.register(spec))
    return specs
