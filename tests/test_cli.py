"""The command line: every command's help, JSON output, and one clear error per bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_cli.cli import app


def command_names():
    import typer.main

    return sorted(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", [None, *command_names()])
def test_every_command_has_help(cli, command):
    args = ["--help"] if command is None else [command, "--help"]
    code, out, _ = cli(*args)
    assert code == 0
    assert "Usage" in out


def test_expected_commands_exist():
    assert {"run", "validate", "plan", "methods", "inspect", "diff"} <= set(command_names())


def write_recipe(tmp_path, tiny_llamas, **extra):
    text = f"""
models:
  math: {tiny_llamas["math"]}
  code: {tiny_llamas["code"]}
fuse:
  method: linear
save:
  path: {tmp_path / "out"}
  dtype: float32
"""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_run_json_and_summary(cli, tiny_llamas, tmp_path):
    recipe = write_recipe(tmp_path, tiny_llamas)
    code, out, _ = cli("run", recipe, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["ok"] is True and report["plan"]["tensors"] == 39
    code, out, _ = cli("run", recipe, "--overwrite")
    assert code == 0 and "wrote" in out


def test_validate_plan_inspect_diff_methods(cli, tiny_llamas, tmp_path):
    recipe = write_recipe(tmp_path, tiny_llamas)
    assert cli("validate", recipe)[0] == 0
    code, out, _ = cli("plan", recipe, "--json")
    plan = json.loads(out)
    assert code == 0 and plan["bytes_written"] == 2 * plan["bytes_read"] // 2
    assert plan["expected_peak_memory"] > 0 and plan["shards"][0]["file"] == "model.safetensors"
    assert not (tmp_path / "out").exists()  # validate and plan never write
    code, out, _ = cli("inspect", tiny_llamas["base"], "--json")
    info = json.loads(out)
    assert info["tensors"] == 39 and info["dtypes"] == {"bfloat16": info["parameters"]}
    assert len(info["shards"]) == 2
    code, out, _ = cli("diff", tiny_llamas["base"], tiny_llamas["base"], "--json")
    rows = json.loads(out)["rows"]
    assert code == 0 and all(
        r["cosine"] == pytest.approx(1.0) and r["relative_l2"] == 0 for r in rows
    )
    code, out, _ = cli("diff", tiny_llamas["base"], tiny_llamas["math"])
    assert code == 0 and "mean cosine" in out
    code, out, _ = cli("methods", "--json")
    names = {m["name"] for m in json.loads(out)["methods"]}
    assert {"linear", "passthrough"} <= names


def assert_failed(result, *fragments, code=1):
    exit_code, out, err = result
    assert exit_code == code, (out, err)
    text = " ".join(err.split())
    for fragment in fragments:
        assert fragment in text, text


def test_unknown_recipe_key(cli, tiny_llamas, tmp_path):
    recipe = write_recipe(tmp_path, tiny_llamas)
    recipe.write_text(recipe.read_text().replace("method: linear", "method: linear\n  sed: 3"))
    assert_failed(cli("run", recipe), "fuse.sed: unknown key; did you mean 'seed'?", code=2)
    assert not (tmp_path / "out").exists()


def test_wrong_type(cli, tiny_llamas, tmp_path):
    recipe = write_recipe(tmp_path, tiny_llamas)
    assert_failed(cli("run", recipe, "--set", "save.shard_size=-5"), "save.shard_size", code=2)


def test_missing_model_path(cli, tiny_llamas, tmp_path):
    recipe = write_recipe(tmp_path, tiny_llamas)
    assert_failed(
        cli("run", recipe, "--set", f"models.code={tmp_path / 'gone'}"), "no such file or directory"
    )
    assert not (tmp_path / "out").exists()


def _mutated_copy(source, target, mutate):
    shutil.copytree(source, target)
    shard = target / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    mutate(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path = target / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {
        k: v for k, v in index["weight_map"].items() if k in tensors or "00001" in v
    }
    index_path.write_text(json.dumps(index))


def test_tensor_missing_in_one_model(cli, tiny_llamas, tmp_path):
    _mutated_copy(tiny_llamas["code"], tmp_path / "code", lambda t: t.pop("lm_head.weight"))
    recipe = write_recipe(tmp_path, tiny_llamas)
    assert_failed(
        cli("run", recipe, "--set", f"models.code={tmp_path / 'code'}"),
        "tensor 'lm_head.weight' is missing in model 'code'",
    )
    assert not (tmp_path / "out").exists()


def test_shape_mismatch(cli, tiny_llamas, tmp_path):
    def grow(tensors):
        tensors["lm_head.weight"] = torch.zeros(300, 64, dtype=torch.bfloat16)

    _mutated_copy(tiny_llamas["code"], tmp_path / "code", grow)
    recipe = write_recipe(tmp_path, tiny_llamas)
    assert_failed(
        cli("run", recipe, "--set", f"models.code={tmp_path / 'code'}"),
        "tensor 'lm_head.weight': shape [300, 64] in model 'code' differs from [256, 64] in 'math'",
    )
    assert not (tmp_path / "out").exists()


def test_corrupt_and_truncated_inputs(cli, tiny_llamas, tmp_path):
    recipe = write_recipe(tmp_path, tiny_llamas)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llamas["code"], broken)
    shard = broken / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:8] + b"{not json" + data[17:])
    assert_failed(
        cli("run", recipe, "--set", f"models.code={broken}"), "not a valid safetensors file"
    )
    shard.write_bytes(data[: len(data) // 2])
    assert_failed(cli("run", recipe, "--set", f"models.code={broken}"), "truncated or corrupt")
    assert not (tmp_path / "out").exists()


def test_existing_output(cli, tiny_llamas, tmp_path):
    recipe = write_recipe(tmp_path, tiny_llamas)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    assert_failed(cli("run", recipe), "output already exists; pass --overwrite")
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"


def test_json_errors_are_machine_readable(cli, tiny_llamas, tmp_path):
    recipe = write_recipe(tmp_path, tiny_llamas)
    code, out, _ = cli("validate", recipe, "--set", "fuse.method=nope", "--json")
    assert code == 2
    payload = json.loads(out)
    assert payload["ok"] is False and "unknown fuse method 'nope'" in payload["error"]


def test_cuda_request_without_cuda(cli, tiny_llamas, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    recipe = write_recipe(tmp_path, tiny_llamas)
    assert_failed(cli("run", recipe, "--device", "cuda"), "no CUDA device is available")


def tiny_pair(tmp_path, poisoned=None):
    """Two one-file checkpoints (``poisoned``: a value to put in the second) and a recipe."""
    for seed in (1, 2):
        weight = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed))
        if seed == 2 and poisoned is not None:
            weight[3, 1] = poisoned
        save_file({"w": weight, "empty": torch.zeros(0, 4)}, str(tmp_path / f"m{seed}.safetensors"))
    recipe = tmp_path / "pair.yaml"
    recipe.write_text(
        f"models: {{one: {tmp_path / 'm1.safetensors'}, two: {tmp_path / 'm2.safetensors'}}}\n"
        f"fuse: {{method: linear}}\nsave: {{path: {tmp_path / 'out'}, dtype: float32}}\n"
    )
    return recipe


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_fail_unless_allowed(cli, tmp_path, value):
    recipe = tiny_pair(tmp_path, poisoned=value)
    assert_failed(
        cli("run", recipe),
        "tensor 'w' (rows 0-6): the merged values include NaN or infinity",
        "the input two holds NaN or infinite values there",
        "--allow-nonfinite",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m1.safetensors",
        "m2.safetensors",
        "pair.yaml",
    ]
    code, _, err = cli("run", recipe, "--allow-nonfinite")
    assert code == 0, err
    written = load_file(tmp_path / "out" / "model.safetensors")["w"]
    assert not torch.isfinite(written[3, 1]) and torch.isfinite(written).sum() == 23


def test_non_finite_recipe_numbers_never_reach_the_output(cli, tmp_path):
    recipe = tiny_pair(tmp_path)
    for value in (".nan", ".inf", "1e309"):
        assert_failed(
            cli("run", recipe, "--set", f"fuse.models={{one: {{weight: {value}}}, two: {{}}}}"),
            "fuse.models.one.weight: must be a finite number",
            code=2,
        )
    assert not (tmp_path / "out").exists()


def test_errors_stay_on_one_line_and_escape_what_they_quote(cli, tmp_path):
    recipe = tiny_pair(tmp_path)
    long_name = "n" * 150
    code, _, err = cli("run", recipe, "--set", f"fuse.method=[bold]{long_name}")
    assert code == 2
    line = next(line for line in err.splitlines() if "unknown fuse method" in line)
    assert f"'[bold]{long_name}'" in line  # not wrapped at 80 columns, markup shown as text


def test_a_lone_surrogate_in_a_name_is_a_message(cli, tmp_path):
    recipe = tiny_pair(tmp_path)
    code, _, err = cli("run", recipe, "--set", "models.three=/nowhere/\udce9.safetensors")
    assert code == 1 and "no such file or directory" in err and "Traceback" not in err


@pytest.mark.parametrize(("option", "value"), [("--chunk-mb", "10" * 20), ("--threads", "10" * 9)])
def test_absurd_resource_options_are_usage_errors(cli, tmp_path, option, value):
    code, _, err = cli("run", tiny_pair(tmp_path), option, value)
    assert code == 2 and option in err
    assert not (tmp_path / "out").exists()


def test_zero_sized_tensors_merge_with_every_method(cli, tmp_path):
    recipe = tiny_pair(tmp_path)
    for method in ("slerp", "ties", "dare_ties", "multislerp"):
        extra = ["--set", "fuse.params.t=0.5"] if method == "slerp" else []
        code, _, err = cli(
            "run", recipe, "--set", f"fuse.method={method}", "--set", "fuse.base=one",
            "--set", "fuse.models=[two]", *extra, "--overwrite",
        )  # fmt: skip
        assert code == 0, (method, err)
        assert load_file(tmp_path / "out" / "model.safetensors")["empty"].shape == (0, 4)


def test_a_model_named_with_a_lone_surrogate_merges_and_gets_a_card(cli, tmp_path):
    recipe = tiny_pair(tmp_path)
    code, _, err = cli(
        "run", recipe, "--set", f"models.x\udce9={tmp_path / 'm1.safetensors'}",
        "--set", "fuse.models=[one, two]",
    )  # fmt: skip
    assert code == 0, err
    assert "x\\udce9" in (tmp_path / "out" / "README.md").read_text()


def test_methods_lists_parameter_choices_and_heads(cli):
    code, out, _ = cli("methods", "--json")
    assert code == 0
    entries = {entry["name"]: entry for entry in json.loads(out)["methods"]}
    rescale = next(p for p in entries["dare_ties"]["params"] if p["name"] == "rescale")
    assert rescale["choices"] == [True, False, "l1"]
    combine = next(p for p in entries["ensemble"]["params"] if p["name"] == "combine")
    assert combine["choices"] == ["mean_logits", "mean_probs", "vote", "weighted"]
    density = next(p for p in entries["ties"]["params"] if p["name"] == "density")
    assert density["choices"] is None
    assert any(p["name"] == "heads" for p in entries["task_arithmetic"]["params"])
    assert not any(p["name"] == "heads" for p in entries["passthrough"]["params"])
    code, text, _ = cli("methods")
    assert "one of 'mean_logits', 'mean_probs', 'vote', 'weighted'" in " ".join(text.split())


def test_every_command_prints_one_json_envelope(cli, tiny_llamas, tmp_path):
    """--json: one object with ok and command for every command (convert prints the recipe
    itself), and errors in the same envelope."""
    recipe = write_recipe(tmp_path, tiny_llamas)
    base, math = tiny_llamas["base"], tiny_llamas["math"]
    commands = {
        "validate": [recipe],
        "plan": [recipe],
        "run": [recipe],
        "inspect": [base],
        "diff": [base, math],
        "methods": [],
    }
    for command, args in commands.items():
        code, out, err = cli(command, *args, "--json")
        assert code == 0, out + err
        payload = json.loads(out)
        assert payload["ok"] is True and payload["command"] == command, payload
    code, out, _ = cli("inspect", tmp_path / "missing", "--json")
    payload = json.loads(out)
    assert code == 1
    assert payload["ok"] is False and payload["command"] == "inspect"
    assert payload["kind"] == "CheckpointError" and "missing" in payload["error"]
