"""The scripts under scripts/ import only names the package has (they run outside the suite,
so a moved or renamed name would otherwise surface only when someone reruns an experiment)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_script_imports_resolve(script):
    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("merge_cli")):
            continue
        module = importlib.import_module(node.module)
        for alias in node.names:
            if hasattr(module, alias.name):
                continue
            try:
                importlib.import_module(f"{node.module}.{alias.name}")
            except ImportError:
                missing.append(f"line {node.lineno}: {node.module}.{alias.name}")
    assert not missing, missing


def test_scripts_are_found():
    assert len(SCRIPTS) >= 10
