"""Greedy soups (Wortsman et al. 2022): a hand-computed case and real digits fine-tunes."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_cli.fuse.datamerge.greedy_soup import greedy_soup
from merge_cli.save import REPORT_FILE
from merge_cli.task.scoring import score

REPO = Path(__file__).resolve().parents[2]

FINETUNES = [f"ft{i}" for i in range(6)]


def test_greedy_soup_hand_computed():
    # One weight; the held-out value is -(w - 1)^2 (best at w = 1).
    states = {"a": 0.0, "b": 3.0, "c": 1.5, "d": 0.5}
    states = {name: {"w": torch.tensor([w])} for name, w in states.items()}

    def value(state):
        return -float((state["w"] - 1.0) ** 2)

    soup, members, individual, soup_value = greedy_soup(list(states), states.__getitem__, value)
    # ranked: c (-0.25), d (-0.25), a (-1), b (-4); c+d = 1.0 (0) joins; +a = 2/3 (-1/9) is
    # worse and is skipped; +b = (1.5+0.5+3)/3 = 5/3 (-4/9) is worse too.
    assert members == ["c", "d"]
    assert individual == {"a": -1.0, "b": -4.0, "c": -0.25, "d": -0.25}
    assert float(soup["w"]) == 1.0 and soup_value == 0.0


def test_greedy_soup_of_six_finetunes_beats_the_best_single_one(
    cli, connectivity_models, digits_task, tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)
    out = tmp_path / "soup"
    models = [
        a
        for n in ["pretrained", *FINETUNES]
        for a in ("--set", f"models.{n}={connectivity_models[n]}")
    ]
    code, stdout, stderr = cli(
        "run", "recipes/connect/greedy_soup.yaml", *models, "--out", out, "--json"
    )
    assert code == 0, stderr
    payload = json.loads(stdout)
    report = payload["report"]
    assert json.loads((out / REPORT_FILE).read_text()) == report
    val = report["models"]
    best = max(FINETUNES, key=lambda n: val[n])
    assert report["best_single"] == best
    # Held-out (val) data decided membership: never worse than the best single fine-tune.
    assert report["greedy_soup"] >= val[best]
    assert report["uniform_soup"] < report["greedy_soup"]  # ft5 (lr 3e-2) spoils the uniform soup
    assert report["members"][0] == best and "ft5" not in report["members"]

    # The saved soup is the uniform average of the members.
    merged = load_file(str(out / "model.safetensors"))
    members = [load_file(str(connectivity_models[n])) for n in report["members"]]
    for name, tensor in merged.items():
        expected = sum(m[name] for m in members) / len(members)
        torch.testing.assert_close(tensor, expected)

    # On the test split, which nothing above saw, the soup is at least as good too.
    test = {r["model"]: r["value"] for r in payload["evaluation"] if r["metric"] == "accuracy"}
    assert test["merged"] >= test[best]
    model = digits_task.build_mlp(128, 2)
    model.load_state_dict(merged)
    direct = score(model, digits_task.data("test"), torch.nn.functional.cross_entropy)
    assert test["merged"] == pytest.approx(direct.accuracy)
    stats = {(r["metric"], r["model"]): r["value"] for r in payload["evaluation"]}
    assert 0.0 < stats["sign_conflicts", "ft0, ft1, ft5"] < 1.0
