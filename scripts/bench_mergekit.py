"""Time merge-cli against mergekit on the same mergekit configuration, same machine, same run.

Generates TinyLlama-1.1B-shaped sharded bf16 checkpoints (hidden 2048, intermediate 5632,
22 layers, 32 heads, 4 KV heads, vocab 32000: 2.2 GB each) with scripts/bench.py's
generator — a base and three "fine-tunes" (the base plus a seeded delta) — then, for each
method, writes one mergekit YAML file and runs it with ``mergekit-yaml`` (CPU, lazy
unpickling, no tokenizer copy) and with ``merge-cli run`` on the very same file, with a warm
page cache for both. Prints wall time, peak RSS and the speed-up per method; with
``--repeat N`` the two tools run N times each, in turn, and the medians are reported (this
benchmark's machine is shared, and single runs of the same command vary by 20% or more).
mergekit is not a dependency of merge-cli: install it in a scratch environment, e.g.

    python3 -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit==0.1.5
    python scripts/bench_mergekit.py --mergekit /tmp/mk/bin/mergekit-yaml --root /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench  # noqa: E402

LAYERS = 22
MODELS = {"math": 1, "code": 2, "chat": 3}

TWO = [
    {"model": "M/math", "parameters": {"weight": 0.5, "density": 0.5}},
    {"model": "M/code", "parameters": {"weight": 0.5, "density": 0.5}},
]
CONFIGS: dict[str, dict] = {
    "linear": {
        "merge_method": "linear",
        "models": [
            {"model": "M/math", "parameters": {"weight": 0.5}},
            {"model": "M/code", "parameters": {"weight": 0.5}},
        ],
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "M/base",
        "models": [
            {"model": "M/math", "parameters": {"weight": 0.5}},
            {"model": "M/code", "parameters": {"weight": 0.5}},
        ],
    },  # fmt: skip
    "ties": {"merge_method": "ties", "base_model": "M/base", "models": TWO},
    "dare_ties": {"merge_method": "dare_ties", "base_model": "M/base", "models": TWO},
    "dare_linear": {"merge_method": "dare_linear", "base_model": "M/base", "models": TWO},
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties",
        "base_model": "M/base",
        "models": TWO,
    },
    "della": {"merge_method": "della", "base_model": "M/base", "models": TWO},
    "sce": {
        "merge_method": "sce",
        "base_model": "M/base",
        "models": [{"model": "M/math"}, {"model": "M/code"}],
        "parameters": {"select_topk": 0.5},
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": "M/base",
        "models": [{"model": "M/base"}, {"model": "M/math"}],
        "parameters": {"t": 0.5},
    },
    "nuslerp": {
        "merge_method": "nuslerp",
        "models": [
            {"model": "M/math", "parameters": {"weight": 0.5}},
            {"model": "M/code", "parameters": {"weight": 0.5}},
        ],
    },
    "multislerp": {
        "merge_method": "multislerp",
        "models": [
            {"model": "M/math", "parameters": {"weight": 1.0}},
            {"model": "M/code", "parameters": {"weight": 1.0}},
            {"model": "M/chat", "parameters": {"weight": 1.0}},
        ],
    },
    "karcher": {
        "merge_method": "karcher",
        "models": [{"model": "M/math"}, {"model": "M/code"}, {"model": "M/chat"}],
    },
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": "M/base",
        "models": [{"model": "M/math"}, {"model": "M/code"}, {"model": "M/chat"}],
    },
    "passthrough": {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "M/math", "layer_range": [0, 16]}]},
            {"sources": [{"model": "M/code", "layer_range": [6, 22]}]},
        ],
    },
}


def make_models(root: Path) -> Path:
    """The base (synthetic weights) and fine-tunes: base + seeded noise (std 1e-3, ~5%)."""
    models = root / "models"
    bench.generate(models / "base", LAYERS, seed=0)
    for name, seed in MODELS.items():
        directory = models / name
        if (directory / "model.safetensors.index.json").exists():
            continue
        directory.mkdir(parents=True)
        generator = torch.Generator().manual_seed(seed)
        for shard in sorted((models / "base").glob("*.safetensors")):
            tensors = load_file(str(shard))
            for key, tensor in tensors.items():
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                tensors[key] = (tensor.float() + noise * 1e-3).to(torch.bfloat16)
            save_file(tensors, str(directory / shard.name), metadata={"format": "pt"})
            del tensors
        for extra in ("model.safetensors.index.json", "config.json"):
            shutil.copy(models / "base" / extra, directory / extra)
    return models


def write_config(root: Path, models: Path, method: str) -> Path:
    """``root/<method>.yaml``: the method's mergekit configuration over ``models``, in bf16."""
    config = root / f"{method}.yaml"
    text = yaml.safe_dump({**CONFIGS[method], "dtype": "bfloat16"}, sort_keys=False)
    config.write_text(text.replace("M/", f"{models}/"))
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-yaml")
    parser.add_argument("--root", type=Path, default=Path("/tmp/merge-cli-bench-mergekit"))
    parser.add_argument("--methods", nargs="+", default=list(CONFIGS))
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool (medians kept)")
    args = parser.parse_args()
    models = make_models(args.root)
    inputs = sorted(models.rglob("*.safetensors"))
    rows = []
    for method in args.methods:
        config = write_config(args.root, models, method)
        runs: dict[str, list[tuple[float, int]]] = {"mergekit": [], "merge-cli": []}
        for _ in range(args.repeat):
            for tool in runs:
                out = args.root / f"out-{tool}"
                shutil.rmtree(out, ignore_errors=True)
                if tool == "mergekit":
                    command = [args.mergekit, str(config), str(out), "--lazy-unpickle",
                               "--no-copy-tokenizer", "--quiet"]  # fmt: skip
                else:
                    command = [sys.executable, "-m", "merge_cli", "run", str(config), "--out",
                               str(out), "--json"]  # fmt: skip
                bench.warm(inputs)
                runs[tool].append(bench.timed(command))
                shutil.rmtree(out, ignore_errors=True)
        times = {tool: (statistics.median(s for s, _ in r), max(m for _, m in r))
                 for tool, r in runs.items()}  # fmt: skip
        row = {
            "method": method,
            "mergekit_s": round(times["mergekit"][0], 1),
            "merge_cli_s": round(times["merge-cli"][0], 1),
            "speedup": round(times["mergekit"][0] / times["merge-cli"][0], 2),
            "mergekit_rss_mb": round(times["mergekit"][1] / 2**20),
            "merge_cli_rss_mb": round(times["merge-cli"][1] / 2**20),
        }
        if args.repeat > 1:
            row["runs_s"] = {tool: [round(s, 1) for s, _ in r] for tool, r in runs.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.keep:
        shutil.rmtree(args.root)
    print()
    print("| method | mergekit 0.1.5 | merge-cli | speed-up | peak RSS mergekit | merge-cli |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['mergekit_s']} s | {r['merge_cli_s']} s | {r['speedup']}× "
            f"| {r['mergekit_rss_mb']} MB | {r['merge_cli_rss_mb']} MB |"
        )


if __name__ == "__main__":
    main()
