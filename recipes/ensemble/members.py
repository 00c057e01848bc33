"""Ensemble members for the digits recipes: eight small MLPs, each trained on 1/8 of "train".

Disjoint training shards (as in sharded or federated training) and three different shapes
make the members diverse; each sees only an eighth of the data, which is what an ensemble
(or a student distilled from it) recovers.

    python recipes/ensemble/members.py examples/digits     # writes s1..s8.safetensors
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = [{"hidden": 32, "depth": 2}, {"hidden": 64, "depth": 1}, {"hidden": 32, "depth": 3}]
#: name -> build_mlp keyword arguments; the recipes give the same per-model task params.
MEMBERS = {f"s{i + 1}": SHAPES[i % len(SHAPES)] for i in range(8)}
EPOCHS = 40
LR = 3e-3


def _digits():
    path = Path(__file__).resolve().parents[1] / "tasks" / "digits.py"
    name = "merge_cli_tasks_digits"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@lru_cache(maxsize=1)
def train_members(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts of the members, each trained on its own shard of the training split."""
    digits = _digits()
    images, labels = digits.split_arrays("train")
    shard = len(labels) // len(MEMBERS)
    states = {}
    for i, (name, arch) in enumerate(MEMBERS.items()):
        x, y = images[i * shard : (i + 1) * shard], labels[i * shard : (i + 1) * shard]
        batches = [(x[j : j + 128], y[j : j + 128]) for j in range(0, len(y), 128)]
        torch.manual_seed(seed + i)
        model = digits.build_mlp(**arch)
        digits.train(model, batches, epochs=EPOCHS, lr=LR, seed=seed + i)
        states[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return states


def save_members(directory: Path, seed: int = 0) -> dict[str, Path]:
    """Write each member as ``directory/NAME.safetensors``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, state in train_members(seed).items():
        paths[name] = directory / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(paths[name]))
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the members to")
    written = save_members(parser.parse_args().out)
    print("wrote " + ", ".join(str(p) for p in written.values()))
