"""``robustmatrix export``: a trained defense's weights, architecture name and a ready
``[pretrained]`` table, so a model trained here can be evaluated elsewhere (or kept when its code
changes) and re-imported without retraining: the re-imported model's cells are the same."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from bench.foundation.errors import RobustMatrixError
from bench.foundation.registry import DEFENSES
from bench.storage.store import Store, checkpoint_dir
from defenses.base import Defense


def export_id(defense_id: str) -> str:
    """The exported model's id: the trained defense's stem with "-export" (its own id stays taken)."""
    return re.sub(r"-v([0-9]+)$", r"-export-v\1", defense_id)


def _weights_file(state: dict[str, torch.Tensor], out: Path, name: str) -> Path:
    """safetensors when the package is importable, else a torch file (read with weights_only)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        path = out / f"{name}.pt"
        torch.save(state, path)
        return path
    path = out / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings, numbers and booleans read the same in TOML


def snippet(name: str, fields: dict[str, Any]) -> str:
    lines = [f'[pretrained."{name}"]'] + [f"{k} = {_toml_value(v)}" for k, v in fields.items() if v is not None]
    return "\n".join(lines) + "\n"


def export_defense(db_path: Path, defense_id: str, out: Path, seed: int | None = None) -> tuple[Path, Path]:
    """Write ``out``/ID-export-vN.{safetensors,pt} and ``out``/pretrained.toml; returns both paths.
    Refuses a defense whose deployed model is more than its weights (inference-time preprocessing,
    a wrapped model), which a [pretrained] table cannot express."""
    with Store.open_existing(db_path) as store:
        query = "SELECT * FROM trainings WHERE defense_id = ?" + (" AND seed = ?" if seed is not None else "")
        rows = store.connection.execute(
            query + " ORDER BY seed, created_at DESC", (defense_id, *([seed] if seed is not None else []))
        ).fetchall()
    if not rows:
        raise RobustMatrixError(
            f"no training of {defense_id}{f' (seed {seed})' if seed is not None else ''} in {db_path}"
        )
    row = rows[0]
    pretrained = str(row["source"]).startswith("pretrained")
    kwargs = json.loads(row["kwargs"])
    if not pretrained and defense_id in DEFENSES:
        factory = DEFENSES.get(defense_id).load()
        cls = getattr(factory, "func", factory)
        overridden = [
            m for m in ("build_model", "preprocess", "deploy") if getattr(cls, m, None) is not getattr(Defense, m)
        ]
        if overridden:
            raise RobustMatrixError(
                f"cannot export {defense_id}: it overrides {', '.join(overridden)}, so its deployed model is more "
                "than its weights"
            )
    path = checkpoint_dir(db_path) / row["checkpoint"]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as exc:  # noqa: BLE001
        raise RobustMatrixError(f"cannot read the checkpoint of {defense_id} ({path}): {type(exc).__name__}") from None
    if pretrained:  # the checkpoint wraps the published weights under "net."
        state = {k[len("net.") :]: v for k, v in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    name = export_id(defense_id)
    weights = _weights_file(state, out, name)
    nature = json.loads(row["nature"])
    fields: dict[str, Any] = {
        "dataset": row["dataset"],
        "architecture": row["architecture"],
        "weights": weights.name,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "trained_against": [
            {"norm": t["norm"], "eps": t["eps"], "attack": t["attack"]} for t in json.loads(row["trained_against"])
        ],
        "randomized": nature.get("randomized", False),
        "differentiable": nature.get("differentiable", True),
        "bpda_approximation": nature.get("bpda_approximation"),
        "saturates_softmax": nature.get("saturates_softmax", False),
        "description": f"{defense_id} (seed {row['seed']}), exported from {Path(db_path).name}",
    }
    if pretrained:
        fields.update({k: kwargs.get(k) for k in ("input_range", "mean", "std")})
    toml = out / "pretrained.toml"
    toml.write_text(
        f"# {defense_id} exported by `robustmatrix export`; weights are read from this file's folder\n"
        + snippet(name, fields)
    )
    return weights, toml
