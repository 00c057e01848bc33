"""Compare merge-cli's spectral, consensus, WUDI and SVC methods with FusionBench's own code.

    python scripts/compare_fusionbench.py --fusionbench-python /tmp/fb-venv/bin/python

Builds one pre-trained state dict and four "fine-tunes" (base + low-rank update + noise:
two matrices and a bias), merges them with merge-cli (the real pipeline: plan, executor,
writer) and, in a separate process under ``--fusionbench-python`` (an environment with
``pip install torch==2.13.0 fusion-bench==0.2.33``), with FusionBench's functions
(scripts/fusionbench_side.py), then prints the largest absolute difference per method.
Results are recorded in docs/results-fusionbench.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from merge_cli.config import recipe_from_dict  # noqa: E402
from merge_cli.io import open_checkpoint  # noqa: E402
from merge_cli.io.checkpoint import read_state_dict  # noqa: E402
from merge_cli.options import RunOptions  # noqa: E402
from merge_cli.pipeline import run  # noqa: E402

TASKS = ["t0", "t1", "t2", "t3"]
SHAPES = {"fc1.weight": (48, 32), "fc1.bias": (48,), "fc2.weight": (24, 48)}
SETTINGS = {
    "iso_alpha": 1.0,
    "common_space_fraction": 0.8,
    "tall_mask_lambda": 0.4,
    "k": 2,
    "ta_lambda": 0.3,
    "svc_alpha": 1.0,
    "ties_tensor": "fc2.weight",
    "ties_k": 0.2,
    "wudi_iter": 300,
}


def make_states(seed: int = 0) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=generator) * 0.5 for k, s in SHAPES.items()}
    tasks = []
    for _ in TASKS:
        state = {}
        for k, shape in SHAPES.items():
            noise = 0.005 * torch.randn(shape, generator=generator)
            if len(shape) == 2:
                left = torch.randn(shape[0], 3, generator=generator)
                right = torch.randn(3, shape[1], generator=generator)
                noise += 0.02 * left @ right
            state[k] = base[k] + noise
        tasks.append(state)
    return base, tasks


def merge_cli_merge(
    root: Path,
    states: dict[str, dict[str, torch.Tensor]],
    method: str,
    params: dict[str, Any],
    models: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    paths = {}
    for name, state in states.items():
        paths[name] = root / f"{name}.safetensors"
        save_file(state, str(paths[name]))
    fuse: dict[str, Any] = {"method": method, "base": "base", "params": params}
    if models is not None:
        fuse["models"] = models
    recipe = recipe_from_dict(
        {
            "models": {n: str(p) for n, p in paths.items()},
            "fuse": fuse,
            "save": {"path": str(root / f"out-{method}"), "dtype": "float32", "model_card": False},
        }
    )
    result = run(recipe, RunOptions(overwrite=True))
    assert result.output is not None
    return read_state_dict(open_checkpoint(str(result.output)))


def wudi_loss(merged: torch.Tensor, deltas: list[torch.Tensor]) -> float:
    """The WUDI objective sum_i ||(tau_m - tau_i) tau_i^T||^2 / ||tau_i||^2."""
    total = 0.0
    for d in deltas:
        d64 = d.double()
        total += float(((merged.double() - d64) @ d64.T).square().sum() / d64.square().sum())
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusionbench-python", required=True)
    args = parser.parse_args(argv)
    base, tasks = make_states()
    s = SETTINGS
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.save({"base": base, "tasks": tasks, "settings": s}, root / "inputs.pt")
        side = REPO / "scripts" / "fusionbench_side.py"
        subprocess.run([args.fusionbench_python, str(side), str(root)], check=True)
        theirs = torch.load(root / "fusionbench.pt")
        states = {"base": base, **dict(zip(TASKS, tasks, strict=True))}
        one = s["ties_tensor"]
        n = base[one].numel()
        # FusionBench keeps floor(K n) + 1 entries per task (k-th smallest, kept inclusive);
        # merge-cli floor(density n): a density that keeps the same count.
        density = (int(n * s["ties_k"]) + 1.5) / n
        ours = {
            "tsv": merge_cli_merge(root, states, "tsv", {}),
            "iso_c": merge_cli_merge(root, states, "iso_c", {"alpha": s["iso_alpha"]}),
            "iso_cts": merge_cli_merge(
                root,
                states,
                "iso_cts",
                {"alpha": s["iso_alpha"], "common_space_fraction": s["common_space_fraction"]},
            ),
            "consensus_task_arithmetic": merge_cli_merge(
                root,
                states,
                "consensus_task_arithmetic",
                {"lambda": s["ta_lambda"], "k": s["k"], "tall_mask_lambda": s["tall_mask_lambda"]},
            ),
            "task_arithmetic_svc": merge_cli_merge(
                root,
                states,
                "task_arithmetic_svc",
                {"lambda": s["ta_lambda"], "svc_alpha": s["svc_alpha"]},
            ),
            "consensus_ties": merge_cli_merge(
                root,
                {name: {one: state[one]} for name, state in states.items()},
                "consensus_ties",
                {"k": s["k"], "tall_mask_lambda": s["tall_mask_lambda"], "density": density},
            ),
            "wudi": merge_cli_merge(root, states, "wudi", {}),
        }
    print("| method | tensor | max abs difference | max abs update |")
    print("|---|---|---:|---:|")
    for method, merged in ours.items():
        for name, tensor in merged.items():
            diff = float((tensor - theirs[method][name]).abs().max())
            update = float((tensor - base[name]).abs().max())
            print(f"| {method} | {name} | {diff:.2e} | {update:.2e} |")
    print("\nWUDI objective per matrix (lower is better):")
    print(
        "| tensor | task-arithmetic sum (descent start) | FusionBench, 300 Adam steps | "
        "merge-cli closed form |"
    )
    print("|---|---:|---:|---:|")
    for name, shape in SHAPES.items():
        if len(shape) != 2:
            continue
        deltas = [t[name] - base[name] for t in tasks]
        losses = [
            wudi_loss(sum(deltas), deltas),
            wudi_loss(theirs["wudi"][name] - base[name], deltas),
            wudi_loss(ours["wudi"][name] - base[name], deltas),
        ]
        print(f"| {name} | " + " | ".join(f"{v:.4g}" for v in losses) + " |")


if __name__ == "__main__":
    main()
