"""Output ensembles: combination rules, fitted weights, ensemble directories, real-data gains."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import merge_cli
from merge_cli.config import recipe_from_dict
from merge_cli.errors import OutputError, PlanError, TaskError
from merge_cli.fuse.ensembles.ensemble import (
    fit_simplex_weights,
    member_probabilities,
    select_weights,
)
from merge_cli.options import RunOptions
from merge_cli.pipeline import run
from merge_cli.task import load_module
from merge_cli.task.ensemble import Ensemble, combine_outputs
from tests.conftest import REPO, single_thread

RECIPE = REPO / "recipes" / "ensemble" / "digits_ensemble.yaml"


def digits_members():
    """recipes/ensemble/members.py (its trained members are cached per process)."""
    return load_module(REPO / "recipes" / "ensemble" / "members.py")


@pytest.fixture(scope="module")
def member_files(tmp_path_factory):
    with single_thread():
        return digits_members().save_members(tmp_path_factory.mktemp("digits_members"))


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_combine_rules_by_hand():
    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 4.0], [0.0, 3.0, 0.0]])
    c = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    torch.testing.assert_close(combine_outputs([a, b], "mean_logits"), (a + b) / 2)
    probs = (a.softmax(-1) + b.softmax(-1)) / 2
    torch.testing.assert_close(combine_outputs([a, b], "mean_probs").exp(), probs)
    weighted = 0.25 * a.softmax(-1) + 0.75 * b.softmax(-1)
    got = combine_outputs([a, b], "weighted", torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(got.exp(), weighted)
    # votes: example 0 -> classes 0, 2, 0 (class 0 wins); example 1 -> 1, 1, 2
    votes = combine_outputs([a, b, c], "vote").exp()
    assert votes.argmax(-1).tolist() == [0, 1]
    torch.testing.assert_close(votes, torch.tensor([[2, 0, 1], [0, 2, 1]]) / 3.0, atol=1e-5, rtol=0)
    # a tie (one vote each) goes to the class with the higher mean probability: b's class 2
    assert combine_outputs([a, b], "vote")[0].argmax() == 2


def em_mixture_weights(p: torch.Tensor, steps: int = 5000) -> torch.Tensor:
    """Independent solver: EM for the mixing weights of a fixed-component mixture."""
    w = torch.full((p.shape[0],), 1.0 / p.shape[0], dtype=torch.float64)
    for _ in range(steps):
        responsibility = w[:, None] * p / (w[:, None] * p).sum(0)
        w = responsibility.mean(1)
    return w


def test_fitted_weights_minimise_the_mixture_nll():
    generator = torch.Generator().manual_seed(0)
    good = torch.rand(400, generator=generator, dtype=torch.float64) * 0.4 + 0.6
    noisy = torch.rand(400, generator=generator, dtype=torch.float64)
    bad = torch.rand(400, generator=generator, dtype=torch.float64) * 0.3
    p = torch.stack([good, noisy, bad])
    weights, nll = fit_simplex_weights(p)
    expected = em_mixture_weights(p)
    torch.testing.assert_close(
        torch.tensor(weights, dtype=torch.float64), expected, atol=2e-4, rtol=0
    )
    uniform = float(-p.mean(0).log().mean())
    assert nll < uniform
    assert weights[2] < 1e-3 and sum(weights) == pytest.approx(1.0)


def test_ensemble_selection_by_hand():
    # member a is right on examples 0 and 1, member b on example 2; the mean gets only 2 right
    a = torch.tensor([[0.7, 0.3], [0.7, 0.3], [0.4, 0.6]])
    b = torch.tensor([[0.2, 0.8], [0.2, 0.8], [0.9, 0.1]])
    probabilities, targets = torch.stack([a, b]), torch.tensor([0, 0, 0])
    # round 1: a again -> (2a + b) / 3 = [.53, .53, .57] gets all three right (b again: one)
    assert select_weights(probabilities, targets, rounds=1) == pytest.approx([2 / 3, 1 / 3])
    # round 2: same accuracy, lower NLL with a third copy of a: (3a + b) / 4
    assert select_weights(probabilities, targets, rounds=2) == pytest.approx([0.75, 0.25])
    # nothing beats the mean when both members are equally good
    assert select_weights(torch.stack([a, a]), targets) == pytest.approx([0.5, 0.5])


def ensemble_recipe(member_files, out, **fuse_params):
    raw = yaml.safe_load(RECIPE.read_text())
    for name, path in member_files.items():
        raw["models"][name]["path"] = str(path)
    raw["fuse"]["params"].update(fuse_params)
    raw["save"]["path"] = str(out)
    return raw


def test_digits_ensemble_beats_its_best_member(member_files, tmp_path, monkeypatch, cli):
    digits = digits_members()._digits()
    monkeypatch.chdir(REPO)  # the recipe's task paths are relative to the repository
    sets = [f"--set=models.{name}.path={path}" for name, path in member_files.items()]
    code, out, err = cli("run", RECIPE, *sets, "--out", tmp_path / "weighted", "--json")
    assert code == 0, err
    rows = json.loads(out)["evaluation"]
    evaluated = {r["model"]: r["value"] for r in rows if r["metric"] == "accuracy"}
    assert set(evaluated) == {*member_files, "merged"}
    assert evaluated["merged"] > max(evaluated[name] for name in member_files)
    weighted = merge_cli.load(tmp_path / "weighted")
    assert isinstance(weighted, Ensemble)
    fit = json.loads((tmp_path / "weighted" / "ensemble.json").read_text())["fit"]
    assert fit["weights"] == "fitted" and fit["fit"] == "selection"
    assert fit["held_out"]["accuracy"] >= fit["held_out_uniform"]["accuracy"]

    members = dict(weighted.members)
    test = digits.data("test")
    accuracy = {name: digits.accuracy(m, test) for name, m in members.items()}
    for rule in ("mean_logits", "mean_probs", "vote"):
        accuracy[rule] = digits.accuracy(Ensemble(members, rule), test)
    accuracy["weighted"] = digits.accuracy(weighted, test)
    assert accuracy["weighted"] == pytest.approx(evaluated["merged"])
    # the NLL-optimal mixture (fit: nll), fitted on val
    probabilities, targets = member_probabilities(list(members.values()), digits.data("val"),
                                                  "cross_entropy")  # fmt: skip
    nll_weights, _ = fit_simplex_weights(probabilities[:, torch.arange(len(targets)), targets])
    accuracy["weighted_nll"] = digits.accuracy(Ensemble(members, "weighted", nll_weights), test)
    nll = {rule: held_out_nll(Ensemble(members, "weighted", w), test)
           for rule, w in (("mean_probs", None), ("weighted_nll", nll_weights))}  # fmt: skip
    print(f"test accuracy {accuracy}; test NLL {nll}; selection weights "
          f"{[round(w, 3) for w in weighted.weights.tolist()]}")  # fmt: skip
    best = max(accuracy[name] for name in members)
    assert accuracy["mean_probs"] > best + 0.02  # 8 test images or more
    assert accuracy["weighted"] >= accuracy["mean_probs"]
    assert nll["weighted_nll"] < nll["mean_probs"]


@torch.no_grad()
def held_out_nll(model, batches) -> float:
    total = sum(float(torch.nn.functional.cross_entropy(model(x), y, reduction="sum"))
                for x, y in batches)  # fmt: skip
    return total / sum(len(y) for _, y in batches)


def test_given_weights_are_normalised_and_saved(member_files, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    raw = ensemble_recipe(member_files, tmp_path / "out", combine="mean_logits")
    for name, weight in zip(member_files, [1, 1, 2, 0, 0, 0, 0, 0], strict=True):
        raw.setdefault("fuse", {}).setdefault("models", {})[name] = {"weight": weight}
    run(recipe_from_dict(raw))
    model = merge_cli.load(tmp_path / "out")
    assert model.weights.tolist() == [0.25, 0.25, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    x = torch.rand(5, 64)
    members = list(model.members.values())
    expected = 0.25 * members[0](x) + 0.25 * members[1](x) + 0.5 * members[2](x)
    torch.testing.assert_close(model(x), expected)
    # members are plain checkpoints: loadable on their own with their task
    task = {"model": "recipes/tasks/digits.py:build_mlp", "params": {"hidden": 32, "depth": 2}}
    s1 = merge_cli.load(tmp_path / "out" / "members" / "s1", task=task)
    torch.testing.assert_close(s1(x), members[0](x))


def test_weights_for_some_members_only_is_an_error(member_files, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    raw = ensemble_recipe(member_files, tmp_path / "out")
    raw["fuse"]["models"] = {"s1": {"weight": 1.0}, "s2": {}, "s3": {}}
    with pytest.raises(
        PlanError, match="give a weight to every member or to none.*missing for s2, s3"
    ):
        run(recipe_from_dict(raw))
    assert not (tmp_path / "out").exists()


def test_validate_refuses_weights_for_some_members_only(member_files, tmp_path, monkeypatch, cli):
    """What a run refuses from the recipe alone, validate and plan refuse too (exit 1)."""
    monkeypatch.chdir(REPO)
    raw = ensemble_recipe(member_files, tmp_path / "out")
    raw["fuse"]["models"] = {"s1": {"weight": 1.0}, "s2": {}, "s3": {}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    for command in ("validate", "plan"):
        code, out, _ = cli(command, str(recipe), "--json")
        assert code == 1, out
        assert "missing for s2, s3" in json.loads(out)["error"]
    assert not (tmp_path / "out").exists()


def test_output_is_never_half_written(member_files, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    raw = ensemble_recipe(member_files, out, combine="mean_probs")
    run(recipe_from_dict(raw))
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        run(recipe_from_dict(raw))
    before = (out / "ensemble.json").read_text()

    from merge_cli import save

    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    original = save.save_checkpoint
    monkeypatch.setattr(save, "save_checkpoint", failing_save)
    with pytest.raises(OutputError, match="nothing was written there"):
        run(recipe_from_dict(raw), RunOptions(overwrite=True))
    assert (out / "ensemble.json").read_text() == before  # the old output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial directory left
    monkeypatch.setattr(save, "save_checkpoint", original)
    run(
        recipe_from_dict(ensemble_recipe(member_files, out, combine="vote")),
        RunOptions(overwrite=True),
    )
    assert json.loads((out / "ensemble.json").read_text())["combine"] == "vote"


def test_load_needs_a_task_for_a_plain_checkpoint(member_files):
    with pytest.raises(TaskError, match="say how to build the model"):
        merge_cli.load(member_files["s1"])


def test_ensemble_of_transformers_models(tiny_llamas, tmp_path):
    transformers = pytest.importorskip("transformers")
    raw = {
        "models": {"math": str(tiny_llamas["math"]), "code": str(tiny_llamas["code"])},
        "task": {"model": "transformers", "loss": "causal_lm"},
        "fuse": {"method": "ensemble", "params": {"combine": "mean_logits"}},
        "save": {"path": str(tmp_path / "out")},
    }
    run(recipe_from_dict(raw))
    assert (tmp_path / "out" / "members" / "math" / "config.json").exists()
    ensemble = merge_cli.load(tmp_path / "out")
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # members run in their checkpoints' dtype (bf16); mean in float32
        logits = [
            transformers.AutoModelForCausalLM.from_pretrained(tiny_llamas[n])(ids).logits.float()
            for n in ("math", "code")
        ]
        torch.testing.assert_close(ensemble(ids), (logits[0] + logits[1]) / 2)
