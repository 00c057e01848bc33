"""Multi-task merging benchmark: one pre-trained MLP trunk fine-tuned on several tasks.

    python scripts/multitask_merging.py [--out examples/multitask]

Pre-trains a trunk (with a 10-class digits head) on the digits training split, fine-tunes
a copy on each task (parity, ge5, mod3 of the digit images; breast_cancer and wine tabular
data, see recipes/tasks/multitask.py) with a fresh task head, saves every model as
safetensors under ``--out``, merges the trunks (each task keeps its own head) and prints the
test accuracy of every task for: each fine-tuned model alone, then every merge, each run by
merge-cli from a recipe with ``heads``: the simple average, task arithmetic (lambda 0.3) and
TIES (the recipes under recipes/multitask/, with the models' paths set), Fisher, RegMean
and AdaMerging (the recipes under recipes/datamerge/, built here with each model's task).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from merge_cli.config import load_recipe, recipe_from_dict  # noqa: E402
from merge_cli.fuse.datamerge.heads import task_state_dict  # noqa: E402
from merge_cli.io import open_checkpoint  # noqa: E402
from merge_cli.io.checkpoint import read_state_dict  # noqa: E402
from merge_cli.options import RunOptions  # noqa: E402
from merge_cli.pipeline import run  # noqa: E402
from merge_cli.task import load_callable  # noqa: E402

TASK_FILE = REPO / "recipes" / "tasks" / "multitask.py"
DIGITS_FILE = REPO / "recipes" / "tasks" / "digits.py"
TASKS = ["parity", "ge5", "mod3", "breast_cancer", "wine"]
HEADS = r"re:^head\."
#: Data-free merges: table row -> recipe under recipes/multitask/ (task arithmetic's lambda
#: is 0.3 there, as in the AdaMerging and FusionBench comparisons).
RECIPE_DIR = REPO / "recipes" / "multitask"
PER_TENSOR_RECIPES = {
    "simple average": "linear",
    "task arithmetic": "task_arithmetic",
    "ties": "ties",
}
#: Per-method fuse params used here (recipes under recipes/datamerge/ use the same).
DATA_METHODS: dict[str, dict[str, Any]] = {
    "fisher": {"num_examples": 256},
    "regmean": {"num_examples": 256, "alpha": 0.9},
    "adamerging": {"granularity": "layer"},  # the paper's: init 0.3, Adam lr 1e-3, 500 steps
}


def _task(name: str) -> Any:
    return load_callable(f"{TASK_FILE}:{name}", "multitask")


def _digits(name: str) -> Any:
    return load_callable(f"{DIGITS_FILE}:{name}", "digits")


def make_models(
    root: Path,
    hidden: int = 128,
    depth: int = 2,
    pretrain_epochs: int = 20,
    probe_epochs: int = 10,
    finetune_epochs: int = 10,
    finetune_lr: float = 3e-3,
    seed: int = 0,
) -> dict[str, Path]:
    """Pre-train a trunk on digits, then per task: fit a new head on the frozen trunk (a
    linear probe), freeze it and fine-tune the trunk (as task arithmetic and FusionBench
    fine-tune CLIP under frozen zero-shot heads); save each model as safetensors."""
    build, data, train = _task("build_model"), _task("data"), _digits("train")
    torch.manual_seed(seed)
    base = train(
        build("digits", hidden, depth), data("train", "digits"), pretrain_epochs, seed=seed
    )
    paths = {"base": root / "base"}
    models = {"base": base}
    for index, task in enumerate(TASKS):
        torch.manual_seed(seed + 1 + index)
        model = build(task, hidden, depth)
        model.trunk.load_state_dict(base.trunk.state_dict())
        batches = data("train", task)
        model.trunk.requires_grad_(False)
        train(model, batches, probe_epochs, lr=1e-2, seed=seed + 1 + index)
        model.trunk.requires_grad_(True)
        model.head.requires_grad_(False)
        models[task] = train(model, batches, finetune_epochs, finetune_lr, seed=seed + 1 + index)
        paths[task] = root / task
    for name, model in models.items():
        paths[name].mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(paths[name] / "model.safetensors"))
    return paths


def recipe(
    paths: dict[str, Path], method: str, out: Path, hidden: int = 128, depth: int = 2, **params
) -> dict[str, Any]:
    """A merge-cli recipe (as a mapping) merging every task model with its own task."""

    def task(name: str) -> dict[str, Any]:
        return {
            "model": f"{TASK_FILE}:build_model",
            "data": f"{TASK_FILE}:data",
            "params": {"task": name, "hidden": hidden, "depth": depth},
        }

    models: dict[str, Any] = {"base": {"path": str(paths["base"]), "task": task("digits")}}
    models.update({t: {"path": str(paths[t]), "task": task(t)} for t in TASKS})
    return {
        "models": models,
        "fuse": {
            "method": method,
            "base": "base",
            "models": list(TASKS),
            "params": {"heads": HEADS, **DATA_METHODS.get(method, {}), **params},
        },
        "save": {"path": str(out), "model_card": False},
    }


def states(paths: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: read_state_dict(open_checkpoint(str(path))) for name, path in paths.items()}


def recipe_merge(paths: dict[str, Path], stem: str, out: Path) -> dict[str, torch.Tensor]:
    """Run recipes/multitask/<stem>.yaml on the models at ``paths``; return the output."""
    overrides = [f"models.{name}={path}" for name, path in paths.items()]
    parsed = load_recipe(RECIPE_DIR / f"{stem}.yaml", overrides, str(out))
    result = run(parsed, RunOptions(overwrite=True))
    return read_state_dict(open_checkpoint(str(result.output)))


def accuracy(state: dict[str, torch.Tensor], task: str, hidden: int, depth: int) -> float:
    model = _task("build_model")(task, hidden, depth)
    model.load_state_dict(state)
    return _digits("accuracy")(model, _task("data")("test", task))


def evaluate_merged(merged: dict[str, torch.Tensor], hidden: int, depth: int) -> dict[str, float]:
    return {t: accuracy(task_state_dict(merged, t), t, hidden, depth) for t in TASKS}


def benchmark(root: Path, hidden: int = 128, depth: int = 2, **train) -> dict[str, Any]:
    """Train (into ``root``), merge with every method, and return accuracies per method."""
    paths = make_models(root, hidden, depth, **train)
    models = states(paths)
    results: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    results["individual"] = {t: accuracy(models[t], t, hidden, depth) for t in TASKS}
    started = time.perf_counter()
    for row, stem in PER_TENSOR_RECIPES.items():
        merged = recipe_merge(paths, stem, root / "merged" / stem)
        results[row] = evaluate_merged(merged, hidden, depth)
    seconds["data-free"] = time.perf_counter() - started
    reports = {}
    for method in DATA_METHODS:
        started = time.perf_counter()
        out = root / "merged" / method
        parsed = recipe_from_dict(recipe(paths, method, out, hidden, depth))
        result = run(parsed, RunOptions(overwrite=True))
        merged = read_state_dict(open_checkpoint(str(result.output)))
        results[method] = evaluate_merged(merged, hidden, depth)
        reports[method] = result.report
        seconds[method] = time.perf_counter() - started
    for row in results.values():
        row["average"] = sum(row[t] for t in TASKS) / len(TASKS)
    return {"results": results, "paths": paths, "reports": reports, "seconds": seconds}


def table(results: dict[str, dict[str, float]]) -> str:
    columns = [*TASKS, "average"]
    lines = [
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for method, row in results.items():
        lines.append(f"| {method} | " + " | ".join(f"{100 * row[c]:.1f}" for c in columns) + " |")
    return "\n".join(lines)


def mean_results(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {
        method: {key: sum(run[method][key] for run in runs) / len(runs) for key in row}
        for method, row in runs[0].items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/multitask"))
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="repeat with these seeds (first: --out)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    runs = []
    for index, seed in enumerate(args.seeds):
        root = args.out if index == 0 else args.out / "seeds" / str(seed)
        outcome = benchmark(root, args.hidden, args.depth, seed=seed)
        runs.append(outcome["results"])
        print(f"seed {seed} (test accuracy, %):")
        print(table(outcome["results"]))
        print("seconds:", {k: round(v, 2) for k, v in outcome["seconds"].items()}, "\n")
    if len(runs) > 1:
        print(f"mean over seeds {args.seeds}:")
        print(table(mean_results(runs)))
    print("adamerging coefficients:", args.out / "merged" / "adamerging" / "merge_report.json")


if __name__ == "__main__":
    main()
