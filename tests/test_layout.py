"""The package layout's rules: the engine (`vqwavenet`) and the app import no torch, and import
nothing from training or the exporter; `export/` holds only the torch -> ONNX exporter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH_FREE = ("vqwavenet", "app")


def modules(package: str) -> list[str]:
    names = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported(path: Path) -> set[str]:
    """Top-level modules and ``model.*`` modules a file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_every_engine_and_app_module_imports_without_torch():
    """Each module of `vqwavenet` and `app` imports in a fresh process where importing torch
    fails. Control: `export.onnx_export` fails there."""
    names = [m for p in TORCH_FREE for m in modules(p)]
    script = (
        "import importlib, sys\n"
        "sys.modules['torch'] = None  # any import of torch raises ImportError\n"
        "for name in sys.argv[1:]:\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *names], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    control = subprocess.run(
        [sys.executable, "-c", script, "export.onnx_export"], cwd=ROOT, capture_output=True
    )
    assert control.returncode != 0


def test_engine_and_app_import_no_training_code():
    """The engine and the app reach into the model package for the pure-numpy geometry only,
    and never into training or the exporter; the app reaches the engine only through its
    package."""
    for package in TORCH_FREE:
        for path in (ROOT / package).rglob("*.py"):
            for name in imported(path):
                top = name.split(".")[0]
                assert top not in ("torch", "training", "export", "benchmarks"), (path, name)
                assert top != "model" or name == "model.geometry", (path, name)


def test_export_holds_only_the_exporter():
    assert sorted(p.name for p in (ROOT / "export").glob("*.py")) == [
        "__init__.py",
        "__main__.py",
        "onnx_export.py",
    ]
