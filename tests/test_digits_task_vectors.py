"""Real data: task arithmetic and TIES keep most of each digits fine-tune's accuracy."""

from __future__ import annotations

from merge_cli.task import load_module
from tests.conftest import REPO


def test_merged_models_keep_most_of_each_task_and_beat_the_pretrained_model(tmp_path):
    script = load_module(REPO / "scripts" / "digits_task_vectors.py")
    results = script.run_experiment(tmp_path, {"task_arithmetic": (0.6,), "ties": (1.0,)})
    fine, pretrained = results["finetuned"], results["pretrained"]
    for method in ("task_arithmetic", "ties"):
        normalized = {g: results[method][g] / fine[g] for g in script.GROUPS}
        assert min(normalized.values()) >= 0.85, (method, normalized)
        assert sum(normalized.values()) / len(normalized) >= 0.9, (method, normalized)
        for group in script.GROUPS:
            assert results[method][group] > pretrained[group], (method, group, results)
    assert sum(pretrained[g] / fine[g] for g in script.GROUPS) / 3 < 0.8
