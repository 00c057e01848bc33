"""The save stage's output checks: never write onto an input, the recipe, or a directory
merge-cli did not write."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from merge_cli.errors import OutputError
from merge_cli.save import check_output_target, is_merge_cli_output


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """models/one, models/two (directories) and recipe.yaml in a working directory."""
    for seed, name in ((1, "one"), (2, "two")):
        (tmp_path / "models" / name).mkdir(parents=True)
        generator = torch.Generator().manual_seed(seed)
        save_file(
            {"w": torch.randn(8, 4, generator=generator)},
            str(tmp_path / "models" / name / "model.safetensors"),
        )
        (tmp_path / "models" / name / "config.json").write_text("{}")
    (tmp_path / "recipe.yaml").write_text(
        "models:\n  one: models/one\n  two: models/two\nfuse: {method: linear}\n"
        "save: {path: out, dtype: float32}\n"
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def digest(root):
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize(
    ("out", "relation"),
    [("models/one", "is"), ("models", "contains"), (".", "contains"), ("./models/../", "contains")],
)
def test_overwrite_onto_an_input_or_the_recipe_is_refused(cli, workspace, out, relation):
    before = digest(workspace)
    for command in (["validate", "recipe.yaml"], ["run", "recipe.yaml", "--overwrite"]):
        code, _, err = cli(*command, "--out", out)
        assert code == 1
        assert f"the output directory {relation} " in err and "an input of this run" in err
        assert "Traceback" not in err
    assert digest(workspace) == before
    assert sorted(p.name for p in workspace.iterdir()) == ["models", "recipe.yaml"]


def test_output_may_not_hold_the_recipe(workspace, tmp_path):
    recipe = workspace / "sub" / "recipe.yaml"
    with pytest.raises(OutputError, match="output directory contains .*recipe.yaml"):
        check_output_target(workspace / "sub", [recipe], overwrite=True)


def test_overwrite_replaces_only_a_merge_cli_output(cli, workspace):
    (workspace / "out").mkdir()
    (workspace / "out" / "thesis.tex").write_text("years of work")
    code, _, err = cli("run", "recipe.yaml", "--overwrite")
    assert code == 1 and "is not a merge-cli output" in err
    assert (workspace / "out" / "thesis.tex").read_text() == "years of work"
    (workspace / "out" / "thesis.tex").unlink()  # an empty directory may be replaced
    assert cli("run", "recipe.yaml", "--overwrite")[0] == 0
    assert cli("run", "recipe.yaml", "--overwrite")[0] == 0  # and an earlier output
    assert sorted(p.name for p in (workspace / "out").iterdir()) == [
        "README.md",
        "config.json",
        "merge_recipe.yaml",
        "model.safetensors",
    ]


def test_what_counts_as_a_merge_cli_output(tmp_path):
    assert is_merge_cli_output(tmp_path)
    (tmp_path / "README.md").write_text("# my notes")
    assert not is_merge_cli_output(tmp_path)
    (tmp_path / "README.md").write_text("---\ntags:\n- merge\n- merge-cli\n---\n")
    assert is_merge_cli_output(tmp_path)
    (tmp_path / "README.md").unlink()
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    assert is_merge_cli_output(tmp_path)
