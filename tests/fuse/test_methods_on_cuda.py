"""On a GPU the task-vector methods give the CPU's result (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from merge_cli.fuse.tensorwise.hashing import uniform_range
from tests.fuse.fuse_harness import random_models

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_random_drops_are_identical_on_cpu_and_cuda():
    assert torch.equal(
        uniform_range(123, 1, 2**32 - 500, 10_000),
        uniform_range(123, 1, 2**32 - 500, 10_000, device="cuda").cpu(),
    )


@cuda
@pytest.mark.parametrize(
    "method, params",
    [
        ("ties", {"density": 0.4}),
        ("dare_ties", {"density": 0.4}),
        ("della", {"density": 0.5}),
        ("della_linear", {"density": 0.5}),
        ("dare_linear", {"density": 0.4}),
        ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05}),
        ("task_arithmetic", {}),
        ("linear", {}),
        ("slerp", {"t": 0.3}),
        ("nuslerp", {}),
        ("multislerp", {}),
        ("karcher", {}),
        ("model_stock", {}),
        ("model_stock", {"filter_wise": True}),
        ("sce", {"select_topk": 0.5}),
    ],
)
def test_cuda_merge_matches_cpu(tmp_path, method, params):
    from safetensors.torch import save_file

    from merge_cli.config import recipe_from_dict
    from merge_cli.io import open_checkpoint
    from merge_cli.io.checkpoint import read_state_dict
    from merge_cli.options import RunOptions
    from merge_cli.pipeline import run

    models = random_models(["base", "a", "b"], {"w": (64, 48), "v": (48,)})
    for name, state in models.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    fused = ["a"] if method == "slerp" else ["a", "b"]
    outputs = {}
    for device, chunk in (("cpu", 2**20), ("cuda", 2**20), ("cuda", 1024)):
        recipe = recipe_from_dict(
            {
                "models": {n: str(tmp_path / f"{n}.safetensors") for n in models},
                "fuse": {"method": method, "base": "base", "models": fused, "params": params},
                "save": {"path": str(tmp_path / f"{device}-{chunk}"), "dtype": "float32"},
            }
        )
        output = run(recipe, RunOptions(device=device, chunk_bytes=chunk)).output
        outputs[(device, chunk)] = read_state_dict(open_checkpoint(str(output)))
    for name, tensor in outputs[("cpu", 2**20)].items():
        torch.testing.assert_close(outputs[("cuda", 2**20)][name], tensor, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outputs[("cuda", 1024)][name], tensor, rtol=1e-5, atol=1e-5)
