"""AdaMerging (Yang et al. 2024): learned task-arithmetic coefficients, reported and replayable."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from merge_cli.config import recipe_from_dict
from merge_cli.errors import PlanError
from merge_cli.fuse.datamerge.adamerging import entropy
from merge_cli.options import RunOptions
from merge_cli.pipeline import run
from merge_cli.save import REPORT_FILE
from tests.fuse import datamerge_models as dm
from tests.fuse.datamerge_models import one_thread  # noqa: F401 - autouse fixture

TASKS = {"left": "parity", "right": "mod3", "other": "wine"}
TRUNK = ["trunk.0.weight", "trunk.0.bias"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("adamerging")
    return root, dm.task_models(root / "models", TASKS, hidden=8, scale=0.5)


def arithmetic(states, coefficient, tensor):
    base = states["base"][tensor]
    return base + sum(coefficient(n) * (states[n][tensor] - base) for n in TASKS)


def test_entropy_is_shannon_entropy_of_the_softmax():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    torch.testing.assert_close(entropy(logits), torch.tensor(0.5 * math.log(2.0)))


def test_zero_steps_is_task_arithmetic_at_the_initial_coefficient(models):
    root, paths = models
    recipe = dm.recipe(root, paths, TASKS, "adamerging", root / "out0", steps=0, init=0.3)
    result = run(recipe_from_dict(recipe), RunOptions())
    merged = dm.state(result.output)
    states = {n: dm.state(p) for n, p in paths.items()}
    for tensor in TRUNK:
        torch.testing.assert_close(merged[tensor], arithmetic(states, lambda n: 0.3, tensor))
    assert result.report["coefficients"] == {
        n: {t: pytest.approx(0.3) for t in TRUNK} for n in TASKS
    }


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_learned_coefficients_lower_entropy_and_define_the_merge(models, granularity):
    root, paths = models
    out = root / f"out-{granularity}"
    recipe = dm.recipe(
        root, paths, TASKS, "adamerging", out, steps=40, lr=0.02, granularity=granularity
    )
    result = run(recipe_from_dict(recipe), RunOptions())
    report = result.report
    assert report["granularity"] == granularity
    assert report["entropy"]["final"] < report["entropy"]["initial"]
    coefficients = report["coefficients"]
    assert set(coefficients) == set(TASKS)
    merged = dm.state(result.output)
    states = {n: dm.state(p) for n, p in paths.items()}
    for tensor in TRUNK:
        if granularity == "task":
            value = arithmetic(states, lambda n: coefficients[n], tensor)
        else:
            value = arithmetic(states, lambda n, t=tensor: coefficients[n][t], tensor)
        torch.testing.assert_close(merged[tensor], value, atol=1e-6, rtol=1e-5)
    values = [
        v for c in coefficients.values() for v in (c.values() if isinstance(c, dict) else [c])
    ]
    assert all(0.0 <= v <= 1.0 for v in values) and any(abs(v - 0.3) > 1e-3 for v in values)
    assert json.loads((out / REPORT_FILE).read_text()) == report
    for name in TASKS:  # each task keeps its own head
        assert torch.equal(merged[f"heads.{name}.head.weight"], states[name]["head.weight"])


def test_replaying_the_report_reproduces_the_merge_without_data(models, cli):
    root, paths = models
    recipe = dm.recipe(root, paths, TASKS, "adamerging", root / "learned", steps=20, lr=0.02)
    path = root / "adamerging.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, out, _ = cli("run", path, "--json")
    assert code == 0
    payload = json.loads(out)
    assert payload["report"]["method"] == "adamerging"
    assert payload["report"] == json.loads((root / "learned" / REPORT_FILE).read_text())

    replay = dm.recipe(root, paths, TASKS, "adamerging", root / "replayed")
    replay["fuse"]["params"]["coefficients"] = str(root / "learned" / REPORT_FILE)
    for entry in replay["models"].values():  # no data at all: replaying must not read any
        entry["task"]["data"] = "/nonexistent/data.py:data"
    result = run(recipe_from_dict(replay), RunOptions())
    learned, replayed = dm.state(root / "learned"), dm.state(result.output)
    assert learned.keys() == replayed.keys()
    assert all(torch.equal(learned[k], replayed[k]) for k in learned)
    assert result.report["entropy"] is None


def test_replaying_a_report_for_other_models_fails_clearly(models):
    root, paths = models
    report = root / "bad_report.json"
    report.write_text(json.dumps({"coefficients": {"left": 0.5}}))
    recipe = dm.recipe(root, paths, TASKS, "adamerging", root / "bad", coefficients=str(report))
    with pytest.raises(PlanError, match=r"has no coefficients for \['right', 'other'\]"):
        run(recipe_from_dict(recipe), RunOptions())


def test_adamerging_needs_a_base(models):
    root, paths = models
    recipe = dm.recipe(root, paths, TASKS, "adamerging", root / "nobase")
    del recipe["fuse"]["base"]
    del recipe["models"]["base"]
    from merge_cli.errors import RecipeError

    with pytest.raises(RecipeError, match="needs a base model"):
        recipe_from_dict(recipe)
