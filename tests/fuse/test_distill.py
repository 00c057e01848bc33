"""Distillation: one student of a member's size learns the ensemble's softened outputs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import merge_cli
from merge_cli.config import recipe_from_dict
from merge_cli.errors import PlanError, RecipeError
from merge_cli.fuse.ensembles.distill import (
    DistillParams,
    distill,
    distillation_loss,
    initial_student,
)
from merge_cli.options import RunOptions
from merge_cli.pipeline import open_models, run
from merge_cli.task.ensemble import Ensemble
from tests.conftest import REPO, single_thread
from tests.fuse.test_ensemble import digits_members

RECIPE = REPO / "recipes" / "ensemble" / "digits_distill.yaml"
STUDENT_TASK = {"model": "recipes/tasks/digits.py:build_mlp", "params": {"hidden": 32, "depth": 2}}


@pytest.fixture(scope="module")
def member_files(tmp_path_factory):
    with single_thread():
        return digits_members().save_members(tmp_path_factory.mktemp("digits_members"))


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def distill_recipe(member_files, out, **params) -> dict:
    raw = yaml.safe_load(RECIPE.read_text())
    for name, path in member_files.items():
        raw["models"][name]["path"] = str(path)
    raw["fuse"]["params"].update(params)
    raw["save"]["path"] = str(out)
    return raw


class Notes:
    """A Progress that records the notes (the per-epoch val checks)."""

    def __init__(self):
        self.notes: list[str] = []

    def start(self, description, total, unit="bytes"):
        pass

    def advance(self, amount):
        pass

    def finish(self):
        pass

    def note(self, text):
        self.notes.append(text)


def test_distillation_loss_by_hand():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    t = 3.0
    p = (teacher / t).softmax(-1)
    q = (student / t).softmax(-1)
    expected = t**2 * (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, t), expected)
    assert distillation_loss(teacher, teacher, t) == pytest.approx(0.0, abs=1e-6)


def test_student_recovers_most_of_the_ensemble_gain(member_files, tmp_path, monkeypatch):
    digits = digits_members()._digits()
    monkeypatch.chdir(REPO)
    progress = Notes()
    result = run(
        recipe_from_dict(distill_recipe(member_files, tmp_path / "student")),
        RunOptions(progress=progress),
    )
    student = merge_cli.load(result.output, task=STUDENT_TASK)
    test = digits.data("test")
    members = {
        name: merge_cli.load(path, task={**STUDENT_TASK, "params": digits_members().MEMBERS[name]})
        for name, path in member_files.items()
    }
    best = max(digits.accuracy(m, test) for m in members.values())
    ensemble = digits.accuracy(Ensemble(members, "mean_probs"), test)
    accuracy = digits.accuracy(student, test)
    recovered = (accuracy - best) / (ensemble - best)
    print(f"best member {best:.4f}, ensemble {ensemble:.4f}, student {accuracy:.4f}: "
          f"{recovered:.0%} of the gain")  # fmt: skip
    assert ensemble > best
    assert recovered > 0.5
    size = sum(p.numel() for p in student.parameters())
    assert size == sum(p.numel() for p in members["s1"].parameters())
    epochs = [n for n in progress.notes if n.startswith("epoch ")]
    assert len(epochs) == 40 and all("val_loss" in n and "val_accuracy" in n for n in epochs)
    report = json.loads((result.output / "merge_report.json").read_text())
    assert [h["epoch"] for h in report["history"]] == list(range(41))
    assert report["teacher"]["combine"] == "mean_probs" and report["init"] == "linear"


def test_linear_init_is_the_members_average(member_files, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = recipe_from_dict(distill_recipe(member_files, "unused"))
    params = DistillParams.model_validate(recipe.fuse.params)
    student = initial_student(
        recipe, open_models(recipe), params, list(recipe.models), RunOptions()
    )
    states = digits_members().train_members()
    for name, tensor in student.state_dict().items():
        average = (states["s1"][name] + states["s4"][name] + states["s7"][name]) / 3
        torch.testing.assert_close(tensor, average)


def test_keep_best_restores_the_lowest_val_loss(member_files, monkeypatch):
    digits = digits_members()._digits()
    monkeypatch.chdir(REPO)
    members = {
        name: merge_cli.load(path, task={**STUDENT_TASK, "params": digits_members().MEMBERS[name]})
        for name, path in member_files.items()
    }
    teacher = Ensemble(members)
    student = digits.build_mlp(hidden=32, depth=2)
    params = DistillParams(epochs=4, lr=0.3, keep_best=True)  # a rate that diverges
    train, val = digits.data("train"), digits.data("val")
    student, history = distill(student, teacher, train, val, torch.nn.functional.cross_entropy,
                               params)  # fmt: skip
    best = min(history, key=lambda h: h["val_loss"])
    assert best["val_loss"] < history[-1]["val_loss"]
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(student(x), y, reduction="sum") for x, y in val]
    val_loss = float(sum(losses)) / sum(len(y) for _, y in val)
    assert val_loss == pytest.approx(best["val_loss"], rel=1e-5)


def test_init_errors(member_files, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(PlanError, match="'nothing' is neither a model .* nor a merge method"):
        run(recipe_from_dict(distill_recipe(member_files, tmp_path / "a", init="nothing")))
    with pytest.raises(RecipeError, match="fuse.params.init.*fuse.params.normalize"):
        run(recipe_from_dict(distill_recipe(member_files, tmp_path / "b",
                                            init_params={"normalize": "maybe"})))  # fmt: skip
    with pytest.raises(RecipeError, match="fuse.params.temperature"):
        recipe_from_dict(distill_recipe(member_files, tmp_path / "c", temperature=0))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "params, code, message",
    [
        ({"init": "nothing"}, 1, "'nothing' is neither a model"),
        ({"init_models": ["nobody"]}, 1, "fuse.params.init_models: no model named 'nobody'"),
        ({"init_params": {"normalize": "maybe"}}, 2, "fuse.params.init: fuse.params.normalize"),
    ],
)
def test_validate_refuses_what_a_run_would_refuse(
    member_files, tmp_path, monkeypatch, cli, params, code, message
):
    """``validate`` reads no tensor data but refuses the init a run would refuse, with the
    same exit code and message."""
    monkeypatch.chdir(REPO)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(distill_recipe(member_files, tmp_path / "out", **params)))
    for command in ("validate", "plan", "run"):
        got, out, _ = cli(command, str(recipe), "--json")
        assert got == code, (command, out)
        assert message in json.loads(out)["error"]
    assert not (tmp_path / "out").exists()


def test_distil_two_causal_lms_into_one(tiny_llamas, tmp_path):
    (tmp_path / "tokens.py").write_text(
        "import torch\n\n"
        "def data(split):\n"
        "    seed = {'train': 0, 'val': 1, 'test': 2}[split]\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    ids = [torch.randint(3, 256, (4, 16), generator=g) for _ in range(2)]\n"
        "    return [(x, x) for x in ids]\n"
    )
    raw = {
        "models": {name: str(path) for name, path in tiny_llamas.items()},
        "task": {
            "model": "transformers",
            "data": f"{tmp_path}/tokens.py:data",
            "loss": "causal_lm",
        },
        "fuse": {
            "method": "distill",
            "models": ["math", "code"],  # the teacher; the student starts from base
            "params": {"epochs": 3, "lr": 1e-5, "init": "base", "temperature": 1.0},
        },
        "save": {"path": str(tmp_path / "student"), "dtype": "float32"},
    }
    result = run(recipe_from_dict(raw))
    history = json.loads((result.output / "merge_report.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert all(0 <= h["val_agreement"] <= 1 for h in history)
    assert history[-1]["train_loss"] < history[1]["train_loss"]  # the KL to the teacher falls
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    student = merge_cli.load(result.output)  # config.json -> transformers
    assert type(student).__name__ == "LlamaForCausalLM"


def test_keeping_the_initial_student_is_reported(member_files, tmp_path, monkeypatch):
    """A learning rate that diverges from a good linear init: keep_best keeps epoch 0, and
    the run says so (note and report) instead of passing it off as a trained student."""
    monkeypatch.chdir(REPO)
    progress = Notes()
    recipe = distill_recipe(member_files, tmp_path / "student", epochs=2, lr=5.0)
    result = run(recipe_from_dict(recipe), RunOptions(progress=progress))
    assert result.report["kept_epoch"] == 0
    history = result.report["history"]
    assert all(h["val_loss"] > history[0]["val_loss"] for h in history[1:])
    assert any("keep_best kept epoch 0, the initial student unchanged" in n for n in progress.notes)


def test_kept_epoch_is_the_first_lowest_val_loss_or_the_last():
    from merge_cli.fuse.ensembles.distill import kept_epoch

    history = [{"epoch": e, "val_loss": v} for e, v in enumerate([0.5, 0.3, 0.3, 0.4])]
    assert kept_epoch(history, keep_best=True) == 1
    assert kept_epoch(history, keep_best=False) == 3
