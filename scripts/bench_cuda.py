"""Run the mergekit benchmark's configurations with ``--device cpu`` and ``--device cuda``.

For each method, the same mergekit YAML file (scripts/bench_mergekit.py's) runs through
``merge-cli run`` on the CPU and on the GPU, over the same TinyLlama-shaped bf16 checkpoints
(``--layers`` sets the depth; 22 is TinyLlama-1.1B). Prints wall time, peak RSS, and how far
the GPU's output is from the CPU's: the largest absolute difference and the share of entries
that differ. Seeded methods (DARE, DELLA) draw the same drops on both devices, so every
method is expected to agree up to float32 rounding before the bf16 cast.

    python scripts/bench_cuda.py --root /tmp/bench-cuda --layers 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench  # noqa: E402
import bench_mergekit  # noqa: E402

DEFAULT_METHODS = ["linear", "ties", "dare_ties", "della", "breadcrumbs_ties", "sce", "slerp",
                   "nuslerp", "multislerp", "karcher", "model_stock"]  # fmt: skip


def compare(cpu_dir: Path, cuda_dir: Path) -> tuple[float, float, int]:
    """Largest absolute difference, share of differing entries, tensors compared."""
    largest = 0.0
    differing = 0
    total = 0
    tensors = 0
    for cpu_file in sorted(cpu_dir.glob("*.safetensors")):
        with (
            safe_open(str(cpu_file), "pt") as cpu_shard,
            safe_open(str(cuda_dir / cpu_file.name), "pt") as cuda_shard,
        ):
            for name in cpu_shard.keys():  # noqa: SIM118 (safe_open is not a mapping)
                expected = cpu_shard.get_tensor(name).float()
                actual = cuda_shard.get_tensor(name).float()
                difference = (expected - actual).abs()
                largest = max(largest, difference.max().item())
                differing += int((difference > 0).sum())
                total += expected.numel()
                tensors += 1
    return largest, differing / max(total, 1), tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/merge-cli-bench-cuda"))
    parser.add_argument("--layers", type=int, default=bench_mergekit.LAYERS)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--device", default="cuda", help="the device compared with the CPU")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_cuda.py needs a CUDA device")
    bench_mergekit.LAYERS = args.layers
    models = bench_mergekit.make_models(args.root)
    inputs = sorted(models.rglob("*.safetensors"))
    rows = []
    for method in args.methods:
        config = bench_mergekit.write_config(args.root, models, method)
        row: dict[str, object] = {"method": method}
        for label, device in (("cpu", "cpu"), ("cuda", args.device)):
            out = args.root / f"out-{label}"
            shutil.rmtree(out, ignore_errors=True)
            command = [sys.executable, "-m", "merge_cli", "run", str(config), "--out", str(out),
                       "--device", device, "--json"]  # fmt: skip
            bench.warm(inputs)
            seconds, rss = bench.timed(command)
            row[f"{label}_s"] = round(seconds, 2)
            row[f"{label}_rss_mb"] = round(rss / 2**20)
        largest, share, tensors = compare(args.root / "out-cpu", args.root / "out-cuda")
        row.update(max_abs_diff=largest, differing=round(share, 6), tensors=tensors)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print("| method | cpu | cuda | peak RSS cpu | cuda | max abs diff | entries differing |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['cpu_s']} s | {r['cuda_s']} s | {r['cpu_rss_mb']} MB "
            f"| {r['cuda_rss_mb']} MB | {r['max_abs_diff']:.3g} | {r['differing']:.2%} |"
        )


if __name__ == "__main__":
    main()
