"""`--device cuda` gives the same merge as the CPU (runs only where CUDA is available)."""

from __future__ import annotations

import pytest
import torch

from merge_cli.config import recipe_from_dict
from merge_cli.options import RunOptions
from merge_cli.pipeline import run
from tests.conftest import load_safetensors_dir

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_merge_matches_cpu(tiny_llamas, tmp_path):
    def merged(device: str, chunk_bytes: int):
        recipe = recipe_from_dict(
            {
                "models": {n: str(p) for n, p in tiny_llamas.items()},
                "fuse": {
                    "method": "linear",
                    "models": {"math": {"weight": 0.3}, "code": {"weight": 0.7}},
                },
                "save": {"path": str(tmp_path / f"{device}-{chunk_bytes}"), "dtype": "float32"},
            }
        )
        return load_safetensors_dir(
            run(recipe, RunOptions(device=device, chunk_bytes=chunk_bytes)).output
        )

    on_cpu = merged("cpu", 32 * 2**20)
    on_gpu = merged("cuda", 32 * 2**20)
    on_gpu_chunked = merged("cuda", 4096)
    for name, tensor in on_cpu.items():
        torch.testing.assert_close(on_gpu[name], tensor, rtol=0, atol=1e-6)
        assert torch.equal(on_gpu[name], on_gpu_chunked[name])
