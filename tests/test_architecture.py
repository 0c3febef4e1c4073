"""The package's layers import only downwards, along the pipeline:
base (errors, constants, folders) <- data <- model <- runs <- eval <- the entry functions."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lorafit"
# Lower number, lower layer; a module may import its own layer and the ones below.
LAYERS = {"errors": 0, "constants": 0, "folders": 0, "data": 1, "model": 2, "runs": 3, "eval": 4}
APP = 5  # config checks, the command line, training: they wire the layers together


def _layer(module: str) -> int:
    part = module.split(".")[1] if module.count(".") else ""
    return LAYERS.get(part, APP)


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorafit"):
            found += [node.module] if node.module != "lorafit" else []
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("lorafit.")]
    return found


def test_no_module_imports_against_the_pipeline():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "lorafit." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        own = _layer(module.removesuffix(".__init__"))
        wrong += [f"{module} -> {i}" for i in _imports(path) if _layer(i) > own]
    assert wrong == []


def test_the_tree_shows_the_four_parts():
    parts = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert {"data", "model", "runs", "eval"} <= parts
    flat = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert flat == sorted(
        [
            "errors",
            "constants",
            "folders",
            "config_checks",
            "console",
            "from_axolotl",
            "strict_config",
            "training",
        ]
    )
