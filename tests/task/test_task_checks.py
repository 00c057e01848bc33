"""A task's functions and model are checked before a run reads data: a data function with
the wrong signature, or a task.model whose tensors differ from a checkpoint's, is one
message (from `validate` as from `eval`), never a traceback."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import save_file

from tests.conftest import REPO

DIGITS = REPO / "recipes" / "tasks" / "digits.py"


@pytest.fixture
def recipe(tmp_path, digits_task):
    """An eval recipe on one untrained digits MLP (hidden 16), with a task file of ours."""
    model = digits_task.build_mlp(hidden=16, depth=1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "m.safetensors")
    (tmp_path / "mytask.py").write_text(
        f"import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('d', {str(DIGITS)!r})\n"
        f"digits = importlib.util.module_from_spec(spec)\n"
        f"spec.loader.exec_module(digits)\n\n\n"
        f"def no_split(*, batch_size=64):\n"
        f"    return digits.data('test', batch_size=batch_size)\n"
    )

    def write(data: str, hidden: int = 16) -> str:
        raw = {
            "models": {"m": str(tmp_path / "m.safetensors")},
            "task": {
                "model": f"{DIGITS}:build_mlp",
                "data": data,
                "params": {"hidden": hidden, "depth": 1},
            },
            "evaluate": [{"metric": "accuracy"}],
        }
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    write.tmp_path = tmp_path
    return write


def test_a_data_function_without_the_split_is_one_message(recipe, cli):
    path = recipe(f"{recipe.tmp_path / 'mytask.py'}:no_split")
    expected = (
        "no_split(*, batch_size=64) cannot be called as data(split, **task.params) -> iterable "
        "of (inputs, targets) (too many positional arguments)"
    )
    for command in ("validate", "eval"):
        code, out, _ = cli(command, path, "--json")
        assert code == 1, out
        payload = json.loads(out)
        assert payload["kind"] == "TaskError"
        assert expected in payload["error"]
        assert "Traceback" not in payload["error"]


def test_a_model_that_does_not_fit_the_checkpoint_is_caught_by_validate(recipe, cli):
    path = recipe(f"{DIGITS}:data", hidden=32)
    code, out, _ = cli("validate", path, "--json")
    assert code == 1
    error = json.loads(out)["error"]
    assert "m.safetensors: does not fit task.model" in error
    assert "tensor 'layers.0.bias' has shape [16], the model expects [32]" in error
    code, out, _ = cli("eval", path, "--json")
    assert code == 1
    assert "the task's model expects [32]" in json.loads(out)["error"]


def test_a_fitting_task_validates(recipe, cli):
    code, out, err = cli("validate", recipe(f"{DIGITS}:data"), "--json")
    assert code == 0, out + err
