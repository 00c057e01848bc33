"""Compare merge-cli with mergekit on the same mergekit configurations, method by method.

Builds tiny Llama checkpoints (float32, so both tools see the same inputs), runs every
deterministic method both tools share with ``mergekit-yaml`` and with merge-cli on the same
YAML file, and prints the largest absolute difference over all tensors per configuration.
mergekit is not a dependency of merge-cli: install it in a scratch environment, e.g.

    python3 -m venv /tmp/mk && /tmp/mk/bin/pip install torch mergekit==0.1.5
    python scripts/mergekit_parity.py --mergekit /tmp/mk/bin/mergekit-yaml
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import make_example_models as examples  # noqa: E402

from merge_cli.config import load_recipe  # noqa: E402
from merge_cli.fuse import METHODS  # noqa: E402
from merge_cli.io import open_checkpoint  # noqa: E402
from merge_cli.io.checkpoint import read_state_dict  # noqa: E402
from merge_cli.options import RunOptions  # noqa: E402
from merge_cli.pipeline import run  # noqa: E402

#: name -> (merge-cli method, mergekit configuration without models and dtype)
MODELS = {
    "models": [
        {"model": "M/math", "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": "M/code", "parameters": {"weight": 0.4, "density": 0.7}},
    ],
    "base_model": "M/base",
}
GRADIENT_T = {
    "t": [
        {"filter": "self_attn", "value": [0.0, 0.5, 1.0]},
        {"filter": "mlp", "value": [1.0, 0.5, 0.0]},
        {"value": 0.3},
    ]
}
CONFIGS: dict[str, dict] = {
    "linear": {
        "merge_method": "linear",
        "models": [
            {
                "model": "M/math",
                "parameters": {"weight": [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.6}]},
            },
            {"model": "M/code", "parameters": {"weight": 0.4}},
            {"model": "M/base", "parameters": {"weight": 0.1}},
        ],
    },
    "linear (gradient)": {
        "merge_method": "linear",
        "models": [
            {"model": "M/math", "parameters": {"weight": [0.1, 0.9, 0.3]}},
            {"model": "M/code", "parameters": {"weight": 0.5}},
        ],
    },
    "passthrough (slices)": {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "M/math", "layer_range": [0, 3]}]},
            {"sources": [{"model": "M/code", "layer_range": [1, 4]}]},
        ],
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        **MODELS,
        "parameters": {"lambda": 0.8},
    },
    "ties": {"merge_method": "ties", **MODELS},
    "ties (normalize false)": {
        "merge_method": "ties",
        **MODELS,
        "parameters": {"normalize": False},
    },
    "breadcrumbs": {
        "merge_method": "breadcrumbs",
        **MODELS,
        "parameters": {"gamma": 0.05},
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties",
        **MODELS,
        "parameters": {"gamma": 0.05},
    },
    # DARE and DELLA drop at random (mergekit's torch RNG vs merge-cli's counter hash): compare
    # everything but the drop, with density 1 (nothing dropped).
    "dare_ties (density 1)": {
        "merge_method": "dare_ties",
        "models": [
            {"model": "M/math", "parameters": {"weight": 0.6, "density": 1.0}},
            {"model": "M/code", "parameters": {"weight": 0.4, "density": 1.0}},
        ],
        "base_model": "M/base",
    },
    "dare_linear (density 1)": {
        "merge_method": "dare_linear",
        "models": [
            {"model": "M/math", "parameters": {"weight": 0.6, "density": 1.0}},
            {"model": "M/code", "parameters": {"weight": 0.4, "density": 1.0}},
        ],
        "base_model": "M/base",
        "parameters": {"normalize": True},
    },
    "della (density 1)": {
        "merge_method": "della",
        "models": [
            {"model": "M/math", "parameters": {"weight": 0.6, "density": 1.0, "epsilon": 0.0}},
            {"model": "M/code", "parameters": {"weight": 0.4, "density": 1.0, "epsilon": 0.0}},
        ],
        "base_model": "M/base",
    },
    "slerp": {
        "merge_method": "slerp",
        "models": [{"model": "M/base"}, {"model": "M/math"}],
        "base_model": "M/base",
        "parameters": GRADIENT_T,
    },
    "slerp (slices form)": {
        "merge_method": "slerp",
        "slices": [
            {
                "sources": [
                    {"model": "M/base", "layer_range": [0, 4]},
                    {"model": "M/math", "layer_range": [0, 4]},
                ]
            }
        ],
        "base_model": "M/base",
        "parameters": {"t": 0.4},
    },
    "nuslerp": {
        "merge_method": "nuslerp",
        "models": [
            {"model": "M/math", "parameters": {"weight": 0.7}},
            {"model": "M/code", "parameters": {"weight": 0.3}},
        ],
    },
    "nuslerp (base)": {
        "merge_method": "nuslerp",
        "models": [
            {"model": "M/math", "parameters": {"weight": 0.7}},
            {"model": "M/code", "parameters": {"weight": 0.3}},
        ],
        "base_model": "M/base",
    },
    "multislerp": {
        "merge_method": "multislerp",
        "models": [
            {"model": "M/math", "parameters": {"weight": 0.5}},
            {"model": "M/code", "parameters": {"weight": 0.3}},
            {"model": "M/chat", "parameters": {"weight": 0.2}},
        ],
    },
    "multislerp (base)": {
        "merge_method": "multislerp",
        "models": [
            {"model": "M/math", "parameters": {"weight": 0.5}},
            {"model": "M/code", "parameters": {"weight": 0.5}},
        ],
        "base_model": "M/base",
    },
    "karcher": {
        "merge_method": "karcher",
        "models": [{"model": "M/math"}, {"model": "M/code"}, {"model": "M/chat"}],
    },
    "model_stock": {
        "merge_method": "model_stock",
        "models": [{"model": "M/math"}, {"model": "M/code"}, {"model": "M/chat"}],
        "base_model": "M/base",
    },
    "sce": {
        "merge_method": "sce",
        "models": [{"model": "M/math"}, {"model": "M/code"}],
        "base_model": "M/base",
        "parameters": {"select_topk": 0.5},
    },
    # mergekit's tests give these methods a per-model weight, which mergekit ignores:
    # merge-cli warns and ignores it too (issue 22)
    "slerp (ignored weight)": {
        "merge_method": "slerp",
        "models": [
            {"model": "M/base", "parameters": {"weight": 0.6}},
            {"model": "M/math", "parameters": {"weight": 0.4}},
        ],
        "base_model": "M/base",
        "parameters": {"t": 0.3},
    },
    "karcher (ignored weight)": {
        "merge_method": "karcher",
        "models": [
            {"model": "M/math", "parameters": {"weight": 0.6}},
            {"model": "M/code", "parameters": {"weight": 0.4}},
        ],
    },
    "model_stock (ignored weight)": {
        "merge_method": "model_stock",
        "models": [
            {"model": "M/math", "parameters": {"weight": 0.6}},
            {"model": "M/code", "parameters": {"weight": 0.4}},
        ],
        "base_model": "M/base",
    },
    "model_stock (filter_wise)": {
        "merge_method": "model_stock",
        "models": [{"model": "M/math"}, {"model": "M/code"}, {"model": "M/chat"}],
        "base_model": "M/base",
        "parameters": {"filter_wise": True},
    },
    "sce (ignored weight)": {
        "merge_method": "sce",
        "models": [
            {"model": "M/math", "parameters": {"weight": 0.6}},
            {"model": "M/code", "parameters": {"weight": 0.4}},
        ],
        "base_model": "M/base",
    },
    "nearswap": {
        "merge_method": "nearswap",
        "models": [
            {"model": "M/base", "parameters": {"weight": 0.6}},
            {"model": "M/math", "parameters": {"weight": 0.4}},
        ],
        "base_model": "M/base",
        "parameters": {"t": 0.001},
    },
    "ram": {
        "merge_method": "ram",
        "models": [
            {"model": "M/math", "parameters": {"weight": 0.6}},
            {"model": "M/code", "parameters": {"weight": 0.4}},
            {"model": "M/sparse"},
        ],
        "base_model": "M/base",
    },
    "ramplus_tl": {
        "merge_method": "ramplus_tl",
        "models": [
            {"model": "M/math", "parameters": {"weight": 0.6}},
            {"model": "M/code", "parameters": {"weight": 0.4}},
            {"model": "M/sparse"},
        ],
        "base_model": "M/base",
        "parameters": {"r": 0.05, "alpha": 1.0},
    },
    # the indexes of M/sorted_* list names sorted: lm_head.weight before the layers
    "passthrough (sorted index)": {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "M/sorted_math", "layer_range": [0, 3]}]},
            {"sources": [{"model": "M/sorted_code", "layer_range": [1, 4]}]},
        ],
    },
}


def build_models(root: Path, dtype: str = "float32") -> None:
    base = examples.llama_state_dict(examples.CONFIG, seed=0)
    states = {
        "base": base,
        "math": examples.variant(base, seed=1, scale=0.05),
        "code": examples.variant(base, seed=2, scale=0.05),
        "chat": examples.variant(base, seed=3, scale=0.05),
    }
    config = {**examples.CONFIG, "torch_dtype": dtype}
    torch_dtype = getattr(torch, dtype)
    for name, state in states.items():
        examples.save_hf_directory(state, root / name, config, dtype=torch_dtype)
    # a fine-tune that changed a third of the entries only (RAM counts who changed what)
    generator = torch.Generator().manual_seed(4)
    states["sparse"] = {
        name: torch.where(torch.rand(t.shape, generator=generator) < 1 / 3, t, base[name])
        for name, t in states["chat"].items()
    }
    examples.save_hf_directory(states["sparse"], root / "sparse", config, dtype=torch_dtype)
    for name in ("math", "code"):
        ordered = dict(sorted(states[name].items()))
        examples.save_hf_directory(ordered, root / f"sorted_{name}", config, dtype=torch_dtype)


def write_config(config: dict, models: Path, path: Path, dtype: str = "float32") -> None:
    text = yaml.safe_dump({**config, "dtype": dtype}, sort_keys=False)
    path.write_text(text.replace("M/", f"{models}/"))


def compare(a: Path, b: Path) -> tuple[float, int, str]:
    """Largest absolute difference, tensor count, and where the differences are."""
    left = read_state_dict(open_checkpoint(str(a)))
    right = read_state_dict(open_checkpoint(str(b)))
    if set(left) != set(right):
        missing = sorted(set(left) ^ set(right))[:5]
        raise SystemExit(f"tensor names differ between {a} and {b}: {missing}")
    worst, worst_name, differing, total = 0.0, "", 0, 0
    steps = [0, 0, 0]  # bfloat16 outputs: entries 0, 1, more than 1 rounding steps apart
    for name, tensor in left.items():
        other = right[name]
        if tensor.shape != other.shape:
            raise SystemExit(f"{name}: shape {tensor.shape} vs {other.shape}")
        gap = (tensor.double() - other.double()).abs()
        differing += int((gap > 1e-6 * (1 + other.double().abs())).sum())
        total += gap.numel()
        if gap.numel() and gap.max().item() > worst:
            worst, worst_name = gap.max().item(), name
        if tensor.dtype == other.dtype == torch.bfloat16 and tensor.numel():
            # one step of bfloat16 at the larger magnitude (8 significant bits)
            magnitude = torch.maximum(tensor.double().abs(), other.double().abs())
            step = torch.exp2(torch.floor(torch.log2(magnitude.clamp(min=1e-30))) - 7)
            units = (gap / step).round()
            steps[0] += int((units == 0).sum())
            steps[1] += int((units == 1).sum())
            steps[2] += int((units > 1).sum())
    detail = f"{differing}/{total} entries differ beyond 1e-6 (relative)"
    if sum(steps):
        detail = f"bf16 steps apart: 0: {steps[0]}, 1: {steps[1]}, >1: {steps[2]}"
    if differing:
        detail += f"; largest in {worst_name}"
    return worst, len(left), detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-yaml")
    parser.add_argument("--only", nargs="*", help="configurations to run (default: all)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="checkpoints and the configurations' dtype (bfloat16: mergekit computes in "
        "bfloat16, merge-cli in float32 and rounds once)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="merge-cli-parity-") as tmp:
        root = Path(tmp)
        build_models(root / "models", args.dtype)
        print(f"{'configuration':28s} {'max |merge-cli - mergekit|':>28s}  tensors  note")
        for label, config in CONFIGS.items():
            if args.only and label not in args.only and config["merge_method"] not in args.only:
                continue
            if config["merge_method"] not in METHODS:
                print(f"{label:28s} {'-':>28s}  {'-':>7s}  not in merge-cli yet")
                continue
            slug = "".join(c if c.isalnum() else "_" for c in label)
            path = root / f"{slug}.yaml"
            write_config(config, root / "models", path, args.dtype)
            ours, theirs = root / f"ours_{slug}", root / f"theirs_{slug}"
            started = time.perf_counter()
            done = subprocess.run(
                [args.mergekit, str(path), str(theirs), "--no-copy-tokenizer", "--quiet"],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                print(f"{label:28s} {'-':>28s}  {'-':>7s}  mergekit failed: "
                      f"{done.stderr.strip().splitlines()[-1:]}")  # fmt: skip
                continue
            run(load_recipe(path, out=str(ours)), RunOptions())
            worst, count, detail = compare(ours, theirs)
            seconds = time.perf_counter() - started
            print(f"{label:28s} {worst:28.3e}  {count:7d}  {detail} ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
