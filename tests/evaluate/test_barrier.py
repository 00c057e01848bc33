"""The barrier metric against a direct computation on a small case."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from merge_cli.pipeline import run_evaluation
from tests.evaluate.helpers import digits_recipe, options

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_barrier_values_equal_a_direct_computation(connectivity_models, digits_task, tmp_path):
    paths = {n: connectivity_models[n] for n in ("mlp_a", "mlp_b")}
    recipe = digits_recipe(
        paths,
        [{"metric": "barrier", "between": ["mlp_a", "mlp_b"], "points": 5,
          "params": {"split": "val"}}],
    )  # fmt: skip
    rows, report_path = run_evaluation(recipe, options(), report=tmp_path / "r" / "eval.json")
    details = json.loads(report_path.read_text())["evaluations"][0]["details"]

    a, b = (load_file(str(paths[n])) for n in ("mlp_a", "mlp_b"))
    images, labels = digits_task.split_arrays("val")
    losses, errors = [], []
    model = digits_task.build_mlp(128, 2)
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        model.load_state_dict({k: (1 - t) * a[k] + t * b[k] for k in a})
        with torch.no_grad():
            logits = model(images)
        losses.append(float(F.cross_entropy(logits, labels)))
        errors.append(int((logits.argmax(-1) != labels).sum()) / len(labels))
    assert details["points"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert details["linear"]["loss"] == pytest.approx(losses, rel=1e-5)
    assert [1 - x for x in details["linear"]["accuracy"]] == pytest.approx(errors, abs=1e-9)
    line = [(1 - t) * losses[0] + t * losses[-1] for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    expected_barrier = max(x - y for x, y in zip(losses, line, strict=True))
    by_metric = {r["metric"]: r for r in rows}
    assert by_metric["loss_barrier"]["value"] == pytest.approx(expected_barrier, rel=1e-5)
    assert by_metric["loss_barrier"]["path"] == "linear"
    assert by_metric["loss_barrier"]["model"] == "mlp_a ↔ mlp_b"
    assert expected_barrier > 0.3
    assert (tmp_path / "r" / "barrier_mlp_a_mlp_b.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
def test_a_curve_through_the_midpoint_is_the_linear_path(connectivity_models, tmp_path, kind):
    from merge_cli.connect.path import bend_bytes

    paths = {n: connectivity_models[n] for n in ("mlp_a", "mlp_b")}
    a, b = (load_file(str(paths[n])) for n in ("mlp_a", "mlp_b"))
    bend_file = tmp_path / "bend.safetensors"
    bend_file.write_bytes(bend_bytes({k: (a[k] + b[k]) / 2 for k in a}, {"curve": kind}))
    recipe = digits_recipe(
        paths,
        [{"metric": "barrier", "between": ["mlp_a", "mlp_b"], "points": 5, "path": "curve",
          "params": {"bend": str(bend_file)}}],
    )  # fmt: skip
    rows, report = run_evaluation(recipe, options(), report=tmp_path / "eval.json")
    details = json.loads(report.read_text())["evaluations"][0]["details"]
    assert details["curve_kind"] == kind
    assert details["curve"]["loss"] == pytest.approx(details["linear"]["loss"], rel=1e-5)
    barriers = [r["value"] for r in rows if r["metric"] == "loss_barrier"]
    assert barriers[0] == pytest.approx(barriers[1], rel=1e-4)
