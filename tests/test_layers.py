"""The one-way rule of the architecture, read from the code: every import of every module (lazy ones
inside functions included) must point to its own layer or one below it.

    commands → execution → defenses → attacks → foundation
    defenses → verifiers → foundation (certified training minimises the verifiers' bounds)
    leaderboard → storage → foundation;  execution → storage, verifiers
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

ALLOWED = {
    "foundation": {"foundation"},
    "attacks": {"foundation", "attacks"},
    "defenses": {"foundation", "attacks", "verifiers", "defenses"},
    "verifiers": {"foundation", "verifiers"},
    "storage": {"foundation", "storage"},
    "leaderboard": {"foundation", "storage", "leaderboard"},
    "execution": {"foundation", "storage", "attacks", "defenses", "verifiers", "execution"},
    "commands": {"foundation", "storage", "attacks", "defenses", "verifiers", "execution", "leaderboard", "commands"},
}


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name of ours, or None for a third-party module."""
    parts = module.split(".")
    if parts[0] in ("attacks", "defenses", "leaderboard", "verifiers"):
        return parts[0]
    if parts[0] != "bench":
        return None
    if len(parts) == 1 or parts[1] in ("registry", "__init__"):
        return "foundation"  # the package's version and the public plugin API re-export the foundation
    return parts[1] if parts[1] in ALLOWED else "foundation"


def module_name(path: Path, root: Path) -> str:
    relative = path.relative_to(root).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, name: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from bench import storage` imports the subpackage itself
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if target == "bench"]
    return found


def violations(root: Path) -> list[str]:
    problems = []
    for package in ("attacks", "defenses", "verifiers", "bench", "leaderboard"):
        for path in sorted((root / package).rglob("*.py")) if (root / package).exists() else []:
            name = module_name(path, root)
            own = layer_of(name)
            for line, target in imports_of(path, name):
                other = layer_of(target)
                if other is not None and other not in ALLOWED[own]:
                    problems.append(f"{path.relative_to(root)}:{line}: {own} imports {target} ({other})")
    return problems


def test_every_import_points_down_the_layers() -> None:
    assert violations(REPO) == []


def test_every_module_of_ours_has_a_layer() -> None:
    for path in (REPO / "bench").rglob("*.py"):
        name = module_name(path, REPO)
        assert layer_of(name) in ALLOWED, name
        if name.count(".") >= 2:  # bench.LAYER.module: the layer is the subpackage
            assert name.split(".")[1] in ALLOWED, f"{name} sits in no layer's folder"


@pytest.mark.parametrize(
    ("where", "planted", "expected"),
    [
        ("attacks/planted.py", "from defenses.base import Defense\n", "attacks imports defenses.base (defenses)"),
        ("verifiers/planted.py", "from attacks.pgd import PGD\n", "verifiers imports attacks.pgd (attacks)"),
        ("bench/foundation/planted.py", "def f():\n    import bench.storage.store\n", "foundation imports"),
        ("leaderboard/planted.py", "from bench.execution import runner\n", "leaderboard imports bench.execution"),
        (
            "bench/storage/planted.py",
            "from ..execution.runner import Runner\n",
            "storage imports bench.execution.runner",
        ),
    ],
)
def test_a_planted_cross_layer_import_is_caught(tmp_path: Path, where: str, planted: str, expected: str) -> None:
    for package in (
        "attacks",
        "defenses",
        "verifiers",
        "bench/foundation",
        "bench/storage",
        "bench/execution",
        "leaderboard",
    ):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "bench" / "__init__.py").write_text("")
    assert violations(tmp_path) == []
    (tmp_path / where).write_text(planted)
    found = violations(tmp_path)
    assert len(found) == 1 and expected in found[0], found
