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


def test_each_example_input_is_built_by_one_script():
    """A checkpoint under examples/ that recipes read comes from one builder script (the
    recipe's "Build the inputs first" line), and every recipe reading it builds the same
    model for it: two scripts writing examples/digits/mlp_a.safetensors with different
    shapes made whichever recipe ran second fail."""
    import re

    import yaml

    builders: dict[str, set[str]] = {}
    shapes: dict[str, set[str]] = {}
    for recipe in (REPO / "recipes").rglob("*.yaml"):
        text = recipe.read_text()
        built = re.search(r"Build the (?:inputs|members) first: python (\S+)", text)
        raw = yaml.safe_load(text)
        if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
            continue
        for model in raw["models"].values():
            path = model["path"] if isinstance(model, dict) else model
            if not isinstance(path, str) or not path.startswith("examples/"):
                continue
            if built:
                builders.setdefault(path, set()).add(built.group(1))
            task = (model.get("task") if isinstance(model, dict) else None) or raw.get("task")
            if task and task.get("model"):
                shapes.setdefault(path, set()).add(f"{task['model']} {task.get('params')}")
    assert builders["examples/digits/mlp_a.safetensors"] == {"scripts/make_connectivity_models.py"}
    assert {p: b for p, b in builders.items() if len(b) > 1} == {}
    assert {p: s for p, s in shapes.items() if len(s) > 1} == {}
