"""Recipe parsing, validation errors, overrides."""

from __future__ import annotations

import os
import textwrap

import pytest

from merge_cli.config import load_recipe, recipe_from_dict
from merge_cli.errors import RecipeError


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """
models:
  base: ./ckpt/base
  math: {path: ./ckpt/math}
fuse:
  method: linear
  models:
    math: {weight: 0.6}
  rules:
    - match: "*.mlp.*"
      params: {weight: [0.2, 0.8]}
save:
  path: ./out
  shard_size: 2GB
"""


def test_valid_recipe_parses_with_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert recipe.models["base"].path == "./ckpt/base"
    assert recipe.fuse.model_names(list(recipe.models)) == ["math"]
    assert recipe.save.shard_size == 2_000_000_000
    assert recipe.save.dtype == "keep"


def test_every_error_is_reported_at_once_with_key_paths(tmp_path):
    path = write(
        tmp_path,
        """
        models:
          base: ./b
        fuse:
          method: linear
          modles: [base]
          seed: abc
        save:
          path: ./out
          dtype: float8
        """,
    )
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert f"{path}: fuse.modles: unknown key; did you mean 'models'?" in message
    assert "fuse.seed: Input should be a valid integer" in message
    assert "save.dtype: Input should be 'float32', 'float16', 'bfloat16' or 'keep'" in message
    assert len(caught.value.problems) == 3


def test_method_parameter_errors_name_the_key(tmp_path):
    path = write(tmp_path, GOOD.replace("{weight: 0.6}", "{weight: heavy, density: 0.5}"))
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    problems = caught.value.problems
    assert any(
        p.startswith("fuse.models.math.weight: Input should be a valid number") for p in problems
    )
    assert any("fuse.models.math.density: unknown parameter" in p for p in problems)


def test_unknown_model_and_unbuilt_method(tmp_path):
    path = write(
        tmp_path,
        """
        models: {a: ./a}
        fuse: {method: sce_plus_plus, base: nothere}
        save: {path: ./o}
        """,
    )
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    text = str(caught.value)
    assert "fuse.method: unknown fuse method 'sce_plus_plus'" in text
    assert "fuse.base: no model named 'nothere' in models (have: a)" in text


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "models:\n  a: [1, 2\nfuse: {}\n")
    with pytest.raises(RecipeError, match=r"line \d+, column \d+: invalid YAML"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        load_recipe(tmp_path / "nope.yaml")


def test_set_overrides_and_out(tmp_path):
    recipe = load_recipe(
        write(tmp_path, GOOD),
        overrides=["fuse.models.math.weight=0.25", "fuse.seed=7", "models.base=/x/y"],
        out="/tmp/elsewhere",
    )
    assert recipe.fuse.models["math"]["weight"] == 0.25
    assert recipe.fuse.seed == 7
    assert recipe.models["base"].path == "/x/y"
    assert recipe.save.path == "/tmp/elsewhere"


def test_set_override_is_validated(tmp_path):
    with pytest.raises(
        RecipeError, match="fuse.models.math.weight: Input should be a valid number"
    ):
        load_recipe(write(tmp_path, GOOD), overrides=["fuse.models.math.weight=[a, b]"])
    with pytest.raises(RecipeError, match="expected KEY.PATH=VALUE"):
        load_recipe(write(tmp_path, GOOD), overrides=["fuse.seed"])


def test_fuse_requires_save_path():
    with pytest.raises(RecipeError, match="save.path: required"):
        recipe_from_dict({"models": {"a": "./a"}, "fuse": {"method": "linear"}})


def test_unavailable_stage_method_is_a_clear_error():
    with pytest.raises(RecipeError, match="align.method: unknown alignment method 'teleport'"):
        recipe_from_dict(
            {"models": {"a": "./a"}, "align": {"method": "teleport"}, "save": {"path": "o"}}
        )


def test_save_without_path_suggests_out():
    with pytest.raises(
        RecipeError, match=r"save.path: required key is missing \(or pass --out DIR\)"
    ):
        recipe_from_dict(
            {"models": {"a": "./a"}, "fuse": {"method": "linear"}, "save": {"dtype": "float32"}}
        )


def alias_bomb(levels: int = 9) -> str:
    """A billion-laughs document: ten aliases per level, 10**levels strings expanded."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM (Linux)")
def test_an_alias_bomb_is_refused_with_a_short_message_in_bounded_memory(tmp_path):
    """In a process of its own, so that its peak memory (VmHWM, which unlike ru_maxrss does
    not count the forking parent) is the parse's: expanded, this document holds 10**9
    strings (gigabytes, minutes)."""
    import subprocess
    import sys

    path = write(tmp_path, alias_bomb())
    probe = (
        "import sys\n"
        "from merge_cli.config import load_recipe\n"
        "from merge_cli.errors import RecipeError\n"
        "try:\n"
        "    load_recipe(sys.argv[1])\n"
        "except RecipeError as error:\n"
        "    print(error)\n"
        "status = open('/proc/self/status').read().split('VmHWM:')[1]\n"
        "print(status.split()[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    message, peak_kib = done.stdout.strip().rsplit("\n", 1)
    assert message == (
        f"{path}: line 5, column 5: invalid YAML: more than 100000 values once aliases are expanded"
    )
    assert int(peak_kib) < 1_000_000  # what importing merge-cli takes, not gigabytes


def test_aliases_within_the_limit_still_work(tmp_path):
    merged = load_recipe(
        write(
            tmp_path,
            "models: {a: ./a, b: ./b}\n"
            "fuse: {method: linear, models: {a: &w {weight: 0.5}, b: *w}}\n"
            "save: {path: ./out}\n",
        )
    )
    assert merged.fuse.models == {"a": {"weight": 0.5}, "b": {"weight": 0.5}}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[" * 10_000 + "]" * 10_000, "nested deeper than 64 levels"),
        ("a: &a [*a]\n", "recursive alias"),
        ("".join("  " * i + f"k{i}:\n" for i in range(100)), "nested deeper than 64 levels"),
        (
            f"a: &a {'[' * 40}x{']' * 40}\nb: {'[' * 40}*a{']' * 40}\n",  # 80 deep via *a
            "nested deeper than 64 levels",
        ),
    ],
)
def test_deep_or_recursive_documents_are_refused(tmp_path, text, fragment):
    with pytest.raises(RecipeError, match=fragment):
        load_recipe(write(tmp_path, text))


def test_a_recipe_that_is_not_utf8_is_one_message(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"models: {a: caf\xe9}\n")
    with pytest.raises(RecipeError, match=r"not UTF-8 text \(byte 15: 0xe9\)"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("fuse.models.math.weight", ".nan"),
        ("fuse.models.math.weight", "-.inf"),
        ("fuse.models.math.weight", "1e309"),
        ("fuse.models.math.weight", "[0.1, .nan]"),
        ("fuse.params.weight", "inf"),
        ("fuse.rules", "[{match: '*', params: {weight: [0.2, 1.0e+999]}}]"),
    ],
)
def test_non_finite_numbers_are_refused(tmp_path, where, value):
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, GOOD), [f"{where}={value}"])
    assert "must be a finite number" in str(caught.value)
    assert where.split(".")[1] in str(caught.value)


def test_an_invalid_rule_regex_is_refused_at_validation(tmp_path):
    with pytest.raises(RecipeError, match=r"fuse.rules.0.match: .*invalid regular expression"):
        load_recipe(write(tmp_path, GOOD), ["fuse.rules=[{match: 're:['}]"])


def test_a_flood_of_problems_is_cut_short(tmp_path):
    keys = "".join(f"  bogus{i}: 1\n" for i in range(500))
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, GOOD + "fuse_extra:\n" + keys))
    lines = str(caught.value).splitlines()
    assert len(lines) <= 51


def test_a_huge_key_is_quoted_short(tmp_path):
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, GOOD), ["fuse." + "k" * 100_000 + "=1"])
    assert "unknown key" in str(caught.value) and len(str(caught.value)) < 300
