"""Alignment on real data: two digits MLPs trained from different initialisations.

Trains two MLPs (3 hidden layers of 256 units) and two BatchNorm MLPs on scikit-learn's
digits from different seeds, aligns the second of each pair to the first with every
alignment method, and prints test loss/accuracy at the midpoint of the linear path and the
loss barrier along it (21 points), naive and aligned, with and without REPAIR.

    python scripts/align_digits.py [--epochs 6] [--save examples/digits-align]

The tests (tests/align/test_digits.py) import this module and assert on its numbers.
``--save`` writes the models the recipes under recipes/align/ read (examples/digits-align:
hidden 256, depth 3), apart from scripts/make_connectivity_models.py's examples/digits
(hidden 128, depth 2), whose files have the same names but other shapes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from merge_cli.align import ALIGNERS
from merge_cli.align.context import AlignContext
from merge_cli.align.permuted import PermutedCheckpoint
from merge_cli.align.repair import repair_state_dict
from merge_cli.align.spec import chain_spec
from merge_cli.align.zipit import partial_zip
from merge_cli.connect.interpolate import interpolate_state_dicts, loss_barrier
from merge_cli.io.checkpoint import InMemoryCheckpoint, read_state_dict
from merge_cli.recipe import TaskSpec
from merge_cli.task import Task, load_module

REPO = Path(__file__).resolve().parents[1]
DIGITS_FILE = REPO / "recipes" / "tasks" / "digits.py"


def digits_module():
    return load_module(DIGITS_FILE)


DIGITS = digits_module()


def task(batchnorm: bool) -> Task:
    return Task(
        TaskSpec(
            model=f"{DIGITS_FILE}:build_mlp",
            data=f"{DIGITS_FILE}:data",
            params={"hidden": 256, "depth": 3, "batchnorm": batchnorm},
        )
    )


def train_pair(batchnorm: bool, epochs: int, seeds: tuple[int, int] = (1, 2)) -> list[dict]:
    """Two MLPs trained on the train split from different random initialisations."""
    states = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = DIGITS.build_mlp(256, 3, batchnorm=batchnorm)
        DIGITS.train(model, DIGITS.data("train"), epochs=epochs, seed=seed)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


@torch.no_grad()
def test_metrics(state: dict, batchnorm: bool) -> tuple[float, float]:
    """(test loss, test accuracy) of an MLP with weights ``state``."""
    model = DIGITS.build_mlp(256, 3, batchnorm=batchnorm)
    model.load_state_dict(state)
    model.eval()
    images, labels = DIGITS.split_arrays("test")
    logits = model(images)
    return float(F.cross_entropy(logits, labels)), float(
        (logits.argmax(-1) == labels).float().mean()
    )


def path_barrier(a: dict, b: dict, batchnorm: bool, points: int = 21) -> tuple[float, list]:
    """Test-loss barrier along ``(1 - t) a + t b`` and the metrics at every point."""
    metrics = [
        test_metrics(interpolate_state_dicts(a, b, i / (points - 1)), batchnorm)
        for i in range(points)
    ]
    return loss_barrier([loss for loss, _ in metrics]), metrics


def aligned_views(method: str, states: list[dict], batchnorm: bool, params: dict | None = None):
    """(spec, {name: aligned checkpoint}) for models ``a`` (reference) and ``b``."""
    checkpoints = {"a": InMemoryCheckpoint(states[0]), "b": InMemoryCheckpoint(states[1])}
    model = DIGITS.build_mlp(256, 3, batchnorm=batchnorm)
    spec = chain_spec(checkpoints["a"], [name for name, _ in model.named_modules()])
    aligner = ALIGNERS[method]
    maps = aligner.align(
        checkpoints,
        "a",
        spec,
        aligner.params.model_validate(params or {}),
        AlignContext(task(batchnorm), lambda _text: None),
    )
    views = {
        n: PermutedCheckpoint(c, spec, maps[n]) if n in maps else c for n, c in checkpoints.items()
    }
    return spec, views


def results(pairs: dict[bool, list[dict]]) -> list[dict]:
    """One row per (network, method): midpoint test loss/accuracy and the loss barrier.

    ``pairs`` maps ``batchnorm`` (False: plain MLP, True: BN-MLP) to two trained states.
    """
    rows = []
    for batchnorm, states in pairs.items():
        network = "BN-MLP" if batchnorm else "MLP"
        for name, state in zip("ab", states, strict=True):
            loss, acc = test_metrics(state, batchnorm)
            rows.append(dict(network=network, method=f"endpoint {name}", loss=loss, acc=acc))
        barrier, metrics = path_barrier(states[0], states[1], batchnorm)
        rows.append(
            dict(
                network=network,
                method="naive average",
                loss=metrics[10][0],
                acc=metrics[10][1],
                barrier=barrier,
                end_loss=metrics[-1][0],
            )
        )
        methods = ["weight_matching", "activation_matching"]
        if not batchnorm:
            methods += ["sinkhorn", "zipit"]
        for method in methods:
            started = time.perf_counter()
            spec, views = aligned_views(method, states, batchnorm)
            a, b = read_state_dict(views["a"]), read_state_dict(views["b"])
            seconds = time.perf_counter() - started
            if method == "zipit":  # the zipped model is the views' average, not a path
                loss, acc = test_metrics(interpolate_state_dicts(a, b, 0.5), batchnorm)
                rows.append(
                    dict(network=network, method=method, loss=loss, acc=acc, seconds=seconds)
                )
                rows += partial_zip_rows(network, states, batchnorm, spec, views)
                continue
            barrier, metrics = path_barrier(a, b, batchnorm)
            rows.append(
                dict(
                    network=network,
                    method=method,
                    loss=metrics[10][0],
                    acc=metrics[10][1],
                    barrier=barrier,
                    seconds=seconds,
                    end_loss=metrics[-1][0],
                )
            )
            repaired = repair_state_dict(
                task(batchnorm),
                spec,
                interpolate_state_dicts(a, b, 0.5),
                [views["a"], views["b"]],
                [1.0, 1.0],
            )
            loss, acc = test_metrics(repaired, batchnorm)
            rows.append(dict(network=network, method=f"{method} + REPAIR", loss=loss, acc=acc))
    return rows


def partial_zip_rows(network, states, batchnorm, spec, views) -> list[dict]:
    """ZipIt! zipping only the first k hidden layers (multi-head models), k = 0 .. all - 1."""
    checkpoints = {"a": InMemoryCheckpoint(states[0]), "b": InMemoryCheckpoint(states[1])}
    maps = {name: view.maps for name, view in views.items()}
    rows = []
    for zipped in range(len(spec.groups)):
        model = partial_zip(task(batchnorm), checkpoints, "a", spec, maps, zipped)
        loss, acc = model_metrics(model)
        label = "ensemble of a, b" if zipped == 0 else f"zipit, first {zipped} layer(s) zipped"
        rows.append(dict(network=network, method=label, loss=loss, acc=acc))
    return rows


@torch.no_grad()
def model_metrics(model: torch.nn.Module) -> tuple[float, float]:
    images, labels = DIGITS.split_arrays("test")
    logits = model(images)
    return float(F.cross_entropy(logits, labels)), float(
        (logits.argmax(-1) == labels).float().mean()
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| network | method | midpoint test loss | midpoint test acc | loss barrier (21 pts) "
        "| loss of b at t=1 | align s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        barrier = f"{row['barrier']:.3f}" if "barrier" in row else ""
        end = f"{row['end_loss']:.3f}" if "end_loss" in row else ""
        seconds = f"{row['seconds']:.2f}" if "seconds" in row else ""
        lines.append(
            f"| {row['network']} | {row['method']} | {row['loss']:.3f} | {row['acc']:.3f} | "
            f"{barrier} | {end} | {seconds} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument(
        "--save", type=Path, help="also write mlp_a/mlp_b/bn_a/bn_b.safetensors here (recipes)"
    )
    args = parser.parse_args()
    pairs = {batchnorm: train_pair(batchnorm, args.epochs) for batchnorm in (False, True)}
    if args.save is not None:
        save_pairs(pairs, args.save)
    print(table(results(pairs)))


def save_pairs(pairs: dict[bool, list[dict]], directory: Path) -> dict[str, Path]:
    """Write the trained pairs as safetensors files for recipes/align/*.yaml."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for batchnorm, states in pairs.items():
        for name, state in zip("ab", states, strict=True):
            key = f"{'bn' if batchnorm else 'mlp'}_{name}"
            paths[key] = directory / f"{key}.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, str(paths[key]))
    return paths


if __name__ == "__main__":
    main()
