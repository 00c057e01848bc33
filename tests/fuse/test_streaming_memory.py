"""Streaming holds: a method's peak memory does not grow with the tensor, only with the chunk.

Each method merges a small and a 4x larger tensor with the same chunk budget, in a child
process whose allocator returns every freed buffer to the OS at once (glibc's mmap threshold
set low), so the peak resident set measures the bytes actually alive. Holding one whole
tensor per model would add 3 x 1.5 MiB between the two runs; streaming adds next to nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import REPO

COLUMNS = 512
SIZES = {"small": 256, "large": 1024}  # rows: 0.5 MiB and 2 MiB float32 per model
CHUNK_BYTES = 64 * 2**10
CHILD = r"""
import json, sys
from pathlib import Path
from merge_cli.options import RunOptions
from merge_cli.pipeline import run
from merge_cli.config import recipe_from_dict

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024

root, cases, chunk = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
peaks = {}
for i, (method, base, fused, params) in enumerate(cases):
    for size in ("small", "small", "large"):  # the first run warms up lazy allocations
        recipe = recipe_from_dict({
            "models": {n: str(root / f"{size}-{n}.safetensors") for n in ("base", "a", "b")},
            "fuse": {"method": method, "base": base, "models": fused, "params": params},
            "save": {"path": str(root / f"out-{i}-{size}"), "dtype": "float32"},
        })
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM)
        before = rss("VmRSS:")
        run(recipe, RunOptions(chunk_bytes=chunk, overwrite=True))
        peaks.setdefault(method, {})[size] = rss("VmHWM:") - before
print(json.dumps(peaks))
"""
CASES = [
    ("task_arithmetic", "base", ["a", "b"], {}),
    ("ties", "base", ["a", "b"], {"density": 0.3}),
    ("dare_ties", "base", ["a", "b"], {"density": 0.3, "rescale": "l1"}),
    ("della", "base", ["a", "b"], {"density": 0.4, "epsilon": 0.1}),
    ("sce", "base", ["a", "b"], {"select_topk": 0.5}),
    ("slerp", "base", ["a"], {"t": 0.3}),
    ("nuslerp", None, ["a", "b"], {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("model_stock", "base", ["a", "b"], {}),
]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_does_not_grow_with_the_tensor(tmp_path):
    generator = torch.Generator().manual_seed(0)
    for size, rows in SIZES.items():
        base = torch.randn(rows, COLUMNS, generator=generator)
        for name in ("base", "a", "b"):
            tensor = base if name == "base" else base + 0.01 * torch.randn(base.shape)
            save_file({"w": tensor}, str(tmp_path / f"{size}-{name}.safetensors"))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), json.dumps(CASES), str(CHUNK_BYTES)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        check=True,
    )
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    growth_of_one_tensor = (SIZES["large"] - SIZES["small"]) * COLUMNS * 4
    all_large_inputs = 3 * SIZES["large"] * COLUMNS * 4
    for method, peak in peaks.items():
        growth = peak["large"] - peak["small"]
        assert growth < growth_of_one_tensor / 2, (method, peak)
        assert peak["large"] < all_large_inputs, (method, peak)
