"""Every recipe under recipes/examples runs end to end on tiny Llama checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO

EXAMPLES = sorted((REPO / "recipes" / "examples").glob("*.yaml"))


@pytest.fixture
def workspace(tmp_path, tiny_llamas, monkeypatch) -> Path:
    """A directory laid out like the repo after `make demo` builds the example models."""
    (tmp_path / "examples" / "models").mkdir(parents=True)
    for name, path in tiny_llamas.items():
        (tmp_path / "examples" / "models" / name).symlink_to(path)
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("recipe", EXAMPLES, ids=lambda p: p.stem)
def test_example_recipe_runs(recipe, workspace, cli):
    code, out, err = cli("run", recipe, "--out", workspace / "out", "--json")
    assert code == 0, err
    assert (workspace / "out" / "config.json").exists()
    assert list((workspace / "out").glob("*.safetensors"))
