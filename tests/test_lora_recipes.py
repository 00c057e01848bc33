"""Every recipe under recipes/lora runs end to end on the example base and PEFT adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, _load_script

LORA_RECIPES = sorted((REPO / "recipes" / "lora").glob("*.yaml"))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llamas) -> Path:
    """The example adapters (scripts/make_example_adapters.py) of the example base."""
    root = tmp_path_factory.mktemp("example_adapters")
    script = _load_script("make_example_adapters")
    for seed, (name, settings) in enumerate(script.ADAPTERS.items(), start=1):
        script.build_adapter(tiny_llamas["base"], root / name, seed, settings)
    return root


@pytest.fixture
def workspace(tmp_path, tiny_llamas, adapters, monkeypatch) -> Path:
    """A directory laid out like the repo after building the example models and adapters."""
    (tmp_path / "examples" / "models").mkdir(parents=True)
    for name, path in tiny_llamas.items():
        (tmp_path / "examples" / "models" / name).symlink_to(path)
    (tmp_path / "examples" / "adapters").symlink_to(adapters)
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("recipe", LORA_RECIPES, ids=lambda p: p.stem)
def test_lora_recipe_runs(recipe, workspace, tiny_llamas, cli):
    from tests.conftest import load_safetensors_dir

    for command in ("validate", "plan"):  # the text output, as a person reads it
        code, out, err = cli(command, recipe, "--out", workspace / "out")
        assert code == 0 and ("valid" in out or "stages:" in out), (command, out, err)
    assert not (workspace / "out").exists()
    code, out, err = cli("run", recipe, "--out", workspace / "out", "--json")
    assert code == 0, err
    if recipe.stem == "adapter_cat":  # fuse.output: adapter
        assert_adapter_equals_its_inputs(workspace / "out", tiny_llamas["base"], workspace)
        return
    if recipe.stem == "extract":
        assert_extracted(workspace / "out", tiny_llamas, json.loads(out))
        return
    assert (workspace / "out" / "config.json").exists()
    merged = load_safetensors_dir(workspace / "out")
    base = load_safetensors_dir(tiny_llamas["base"])
    changed = {n for n in base if not (merged[n].float() == base[n].float()).all()}
    # q, k, v, o (both adapters) and up (math) of every layer changed; nothing else did.
    assert {n.split(".")[-2] for n in changed} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "up_proj",
    }
    assert len(changed) == 5 * 4


def assert_adapter_equals_its_inputs(out, base, workspace):
    """adapter_cat.yaml: B·A of the merged adapter is 0.6·math's + 0.4·code's, per module."""
    from merge_cli.io.adapters import open_model
    from merge_cli.io.checkpoint import read_state_dict
    from tests.conftest import load_safetensors_dir

    plain = load_safetensors_dir(base)
    merged = read_state_dict(open_model(str(base), str(out)))
    math = read_state_dict(open_model(str(base), str(workspace / "examples/adapters/math")))
    code = read_state_dict(open_model(str(base), str(workspace / "examples/adapters/code")))
    for name, tensor in plain.items():
        expected = tensor.float() + 0.6 * (math[name] - tensor.float())
        expected += 0.4 * (code[name] - tensor.float())
        assert (merged[name].float() - expected).abs().max() <= 1e-5, name


def assert_extracted(out, tiny_llamas, result):
    """extract.yaml: rank-8 pairs for every matrix (embeddings too), PEFT's config, and the
    applied adapter closer to the fine-tune than the base is, by the reported errors."""
    from merge_cli.io.adapters import open_model
    from merge_cli.io.checkpoint import read_state_dict
    from tests.conftest import load_safetensors_dir

    reports = json.loads((out / "extract_report.json").read_text())
    pairs = [r for r in reports if r["kind"] in ("lora", "embedding")]
    assert {r["rank"] for r in pairs} == {8} and len(pairs) == 4 * 7 + 2
    assert result["plan"]["lowest_retained_energy"] == min(r["energy"] for r in pairs)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (
        config["r"] == config["lora_alpha"] == 8
        and "model.embed_tokens" in config["target_modules"]
    )
    base, math = (
        load_safetensors_dir(tiny_llamas["base"]),
        load_safetensors_dir(tiny_llamas["math"]),
    )
    applied = read_state_dict(open_model(str(tiny_llamas["base"]), str(out)))
    for report in pairs:
        name = report["name"]
        delta = math[name].float() - base[name].float()
        error = (applied[name] - math[name].float()).norm() / delta.norm()
        assert float(error) == pytest.approx(report["relative_error"], rel=1e-3), name
