"""The example recipes under recipes/evaluate (recipes/connect: tests/connect)."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: recipe -> the test that runs it
RECIPES = {
    "recipes/evaluate/barrier.yaml": "test_recipes.py::test_recipe[barrier]",
    "recipes/evaluate/perplexity.yaml": "test_recipes.py::test_recipe[perplexity]",
    "recipes/connect/curve.yaml": "tests/connect/test_curve.py",
    "recipes/connect/greedy_soup.yaml": "tests/connect/test_greedy_soup.py",
}


def test_every_recipe_here_is_run_by_a_test():
    found = {
        str(path.relative_to(REPO))
        for folder in ("recipes/evaluate", "recipes/connect")
        for path in (REPO / folder).glob("*.yaml")
    }
    assert found == set(RECIPES)


@pytest.mark.parametrize("name", ["barrier", "perplexity"])
def test_recipe(name, cli, connectivity_models, tiny_llamas, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = f"recipes/evaluate/{name}.yaml"
    if name == "barrier":
        models = {n: connectivity_models[n] for n in ("mlp_a", "mlp_b")}
        command = ["eval", recipe, "--report", tmp_path / "evaluation.json"]
    else:
        models = tiny_llamas
        command = ["run", recipe, "--out", tmp_path / "merged"]
    overrides = [a for n, p in models.items() for a in ("--set", f"models.{n}={p}")]
    code, stdout, stderr = cli(*command, *overrides)
    assert code == 0, stderr
    assert "evaluation" in stdout  # the table
    report_dir = tmp_path if name == "barrier" else tmp_path / "merged"
    report = json.loads((report_dir / "evaluation.json").read_text())
    values = {(r["metric"], r["model"]): r["value"] for r in report["rows"]}
    if name == "barrier":
        assert values["loss_barrier", "mlp_a ↔ mlp_b"] > 0.3
        assert values["accuracy", "mlp_a"] > 0.9
        assert abs(values["cosine (weights)", "mlp_a · mlp_b"]) < 0.2  # different inits
        assert "loading mlp_a" in stderr  # progress while loading weights
        assert (tmp_path / "barrier_mlp_a_mlp_b.png").exists()
    else:
        perplexities = [values["perplexity", n] for n in ("base", "math", "code", "merged")]
        assert all(200 < p < 300 for p in perplexities)  # untrained, 256-token vocabulary
        assert 0.4 < values["sign_conflicts", "math, code"] < 0.6  # independent random deltas


def test_eval_without_a_destination_writes_nothing(cli, connectivity_models, tmp_path, monkeypatch):
    """`merge-cli eval` with no --report, no --merged and no save.path leaves the working
    directory as it found it (it used to get evaluation.json and the barrier plot)."""
    empty = tmp_path / "cwd"
    empty.mkdir()
    monkeypatch.chdir(empty)
    tasks = REPO / "recipes" / "tasks" / "digits.py"
    overrides = [
        *("--set", f"models.mlp_a={connectivity_models['mlp_a']}"),
        *("--set", f"models.mlp_b={connectivity_models['mlp_b']}"),
        *("--set", f"task.model={tasks}:build_mlp", "--set", f"task.data={tasks}:data"),
    ]
    code, out, err = cli("eval", REPO / "recipes/evaluate/barrier.yaml", *overrides, "--json")
    assert code == 0, out + err
    payload = json.loads(out)
    assert payload["report"] is None
    assert {row["metric"] for row in payload["evaluation"]} >= {"loss_barrier", "accuracy"}
    assert list(empty.iterdir()) == []
