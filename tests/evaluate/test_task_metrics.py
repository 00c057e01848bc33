"""loss and accuracy against direct computations; progress while loading; errors."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from merge_cli.errors import TaskError
from merge_cli.evaluate.stage import evaluate_recipe
from merge_cli.pipeline import open_models, run_evaluation
from tests.evaluate.helpers import DIGITS, RecordingProgress, digits_recipe, options


def _direct(digits_task, path, split):
    model = digits_task.build_mlp(128, 2)
    model.load_state_dict(load_file(str(path)))
    images, labels = digits_task.split_arrays(split)
    with torch.no_grad():
        logits = model(images)
    return float(F.cross_entropy(logits, labels)), int((logits.argmax(-1) == labels).sum()) / len(
        labels
    )


def test_loss_and_accuracy_equal_direct_computations(connectivity_models, digits_task, tmp_path):
    paths = {n: connectivity_models[n] for n in ("mlp_a", "mlp_b")}
    recipe = digits_recipe(
        paths,
        [{"metric": "loss"}, {"metric": "accuracy", "params": {"split": "val"}}],
    )
    progress = RecordingProgress()
    rows, report = run_evaluation(recipe, options(progress), report=tmp_path / "e.json")
    assert report.exists()
    values = {(r["metric"], r["model"], r["split"]): r["value"] for r in rows}
    for name, path in paths.items():
        loss, _ = _direct(digits_task, path, "test")
        _, accuracy = _direct(digits_task, path, "val")
        assert values["loss", name, "test"] == pytest.approx(loss, rel=1e-5)
        assert values["accuracy", name, "val"] == accuracy
    assert values["accuracy", "mlp_a", "val"] > 0.9


def test_loading_reports_progress_in_bytes_and_scores_are_cached(connectivity_models, tmp_path):
    paths = {"mlp_a": connectivity_models["mlp_a"]}
    recipe = digits_recipe(paths, [{"metric": "loss"}, {"metric": "accuracy"}])
    progress = RecordingProgress()
    evaluate_recipe(recipe, open_models(recipe), None, options(progress), tmp_path / "e.json")
    events = progress.events
    starts = [i for i, e in enumerate(events) if e[0] == "start" and e[1] == "loading mlp_a"]
    assert len(starts) == 1  # loss and accuracy share one pass
    total = events[starts[0]][2]
    assert total == paths["mlp_a"].stat().st_size - _header_bytes(paths["mlp_a"])
    advanced = 0
    for event in events[starts[0] + 1 :]:
        if event[0] != "advance":
            break
        advanced += event[1]
    assert advanced == total
    assert ("start", "scoring mlp_a (test)", 3, "batches") in events


def _header_bytes(path):
    with open(path, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def test_task_of_scores_every_model_on_another_models_data(connectivity_models, tmp_path):
    shifted = tmp_path / "shifted.py"
    shifted.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('d', {DIGITS!r})\n"
        "digits = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(digits)\n\n\n"
        "def data(split):\n"
        "    return [(x, (y + 1) % 10) for x, y in digits.data(split)]\n"
    )
    paths = {n: connectivity_models[n] for n in ("mlp_a", "mlp_b")}
    recipe = digits_recipe(
        {**paths, "shifted": paths["mlp_b"]},
        [
            {"metric": "accuracy", "models": ["mlp_a", "mlp_b"]},
            {"metric": "accuracy", "models": ["mlp_a", "mlp_b"], "params": {"task_of": "shifted"}},
        ],
    )
    recipe.models["shifted"].task = recipe.task.model_copy(update={"data": f"{shifted}:data"})
    rows, _ = run_evaluation(recipe, options(), report=tmp_path / "e.json")
    own = [r["value"] for r in rows if "task" not in r]
    other = [r for r in rows if r.get("task") == "shifted"]
    assert min(own) > 0.9
    assert len(other) == 2 and all(r["value"] < 0.1 for r in other)  # labels shifted by one


def test_merged_without_a_fuse_stage_is_a_clear_error(connectivity_models, tmp_path):
    recipe = digits_recipe(
        {"mlp_a": connectivity_models["mlp_a"]}, [{"metric": "accuracy", "models": ["merged"]}]
    )
    with pytest.raises(TaskError, match="pass --merged PATH"):
        run_evaluation(recipe, options(), report=tmp_path / "e.json")
    rows, _ = run_evaluation(
        recipe, options(), merged=str(connectivity_models["mlp_b"]), report=tmp_path / "e.json"
    )
    assert rows[0]["model"] == "merged" and rows[0]["value"] > 0.9
