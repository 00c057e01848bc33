"""Recipe validation of evaluate entries: every problem is reported before anything runs."""

import pytest

from merge_cli.config import recipe_from_dict
from merge_cli.errors import RecipeError


def _problems(evaluate, task=True, **extra):
    raw = {"models": {"a": "a.safetensors", "b": "b.safetensors"}, "evaluate": evaluate, **extra}
    if task:
        raw["task"] = {"model": "m.py:build", "data": "m.py:data"}
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(raw, "r.yaml")
    return error.value.problems


def test_a_metric_that_needs_data_without_a_task_is_a_validation_error():
    problems = _problems([{"metric": "accuracy"}, {"metric": "barrier", "between": ["a", "b"]}],
                         task=False)  # fmt: skip
    assert problems == [
        "evaluate[0]: metric 'accuracy' needs a task with `model` and `data` for model 'a' "
        "(set the recipe's task: or models.a.task)",
        "evaluate[0]: metric 'accuracy' needs a task with `model` and `data` for model 'b' "
        "(set the recipe's task: or models.b.task)",
        "evaluate[1]: metric 'barrier' needs a task with `model` and `data` for model 'a' "
        "(set the recipe's task: or models.a.task)",
        "evaluate[1]: metric 'barrier' needs a task with `model` and `data` for model 'b' "
        "(set the recipe's task: or models.b.task)",
    ]


def test_cli_reports_a_missing_task_with_exit_code_2(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("models: {a: a.safetensors}\nevaluate:\n  - metric: loss\n")
    code, _, stderr = cli("eval", recipe)
    assert code == 2
    assert "metric 'loss' needs a task" in stderr


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"metric": "barrier", "between": ["a"]}, "metric 'barrier' needs two model names"),
        ({"metric": "barrier", "between": ["a", "b"], "path": "spline"},
         "evaluate[0].path: expected one of linear, curve, got 'spline'"),
        ({"metric": "barrier", "between": ["a", "b"], "path": "curve"},
         "evaluate[0].params.bend: path: curve needs a bend"),
        ({"metric": "accuracy", "between": ["a", "b"]},
         "evaluate[0].between: only path metrics (barrier) take `between`"),
        ({"metric": "accuracy", "params": {"splt": "val"}},
         "evaluate[0].params.splt: unknown parameter (metric 'accuracy' takes: split, task_of)"),
        ({"metric": "accuracy", "params": {"split": "dev"}},
         "evaluate[0].params.split: Input should be 'train', 'val' or 'test', got 'dev'"),
        ({"metric": "accuracy", "params": {"task_of": "c"}},
         "evaluate[0].params.task_of: no model named 'c' in models"),
        ({"metric": "perplexity"}, "evaluate[0].params.text: required by metric 'perplexity'"),
        ({"metric": "perplexity", "params": {"text": "missing.txt"}},
         "evaluate[0].params.text: no such file missing.txt"),
        ({"metric": "weight_stats", "params": {"base": "c"}},
         "evaluate[0].params.base: no model named 'c' in models"),
        ({"metric": "accuracy", "models": ["c"]},
         "evaluate[0].models: no model named 'c' in models (have: a, b)"),
    ],
)  # fmt: skip
def test_evaluate_entry_problems(entry, message):
    problems = _problems([entry])
    assert any(message in problem for problem in problems), problems


def test_eval_of_a_recipe_without_evaluate_entries(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("models: {a: a.safetensors}\n")
    code, _, stderr = cli("eval", recipe)
    assert code == 2 and "has no evaluate entries" in stderr
