"""The spectral, consensus, WUDI, Localize-and-Stitch and SVC merges on the multi-task benchmark.

    python scripts/multitask_spectral.py [--out examples/multitask] [--seeds 0 1 2 3]

Uses scripts/multitask_merging.py's models (one pre-trained MLP trunk, five fine-tunes with
frozen task heads, scikit-learn data; each task keeps its own head) and its merge of the
trunks. Every method's hyper-parameters are chosen on the *validation* split (best average
validation accuracy over a small grid, first in grid order on a tie) and only then is the
*test* accuracy reported: task arithmetic and TIES get the same treatment, so they are the
baselines to beat. RegMean (256 examples, alpha 0.9, as in docs/results-multitask.md) and
each task's fine-tuned model are reported for reference. Results: docs/results-multitask.md.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from merge_cli.config import recipe_from_dict  # noqa: E402
from merge_cli.fuse.datamerge.heads import is_head, task_state_dict  # noqa: E402
from merge_cli.fuse.tensorwise.localize_stitch import global_thresholds, stitch  # noqa: E402
from merge_cli.io import open_checkpoint  # noqa: E402
from merge_cli.io.checkpoint import InMemoryCheckpoint, read_state_dict  # noqa: E402
from merge_cli.options import RunOptions  # noqa: E402
from merge_cli.pipeline import run  # noqa: E402
from merge_cli.task import load_module  # noqa: E402

BENCH = load_module(REPO / "scripts" / "multitask_merging.py")
TASKS = BENCH.TASKS
LAMBDAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]
ALPHAS = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0]
TIES_LAMBDAS = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]

#: method -> grid (parameter -> values); every combination is tried on validation data.
GRIDS: dict[str, dict[str, list[Any]]] = {
    "task_arithmetic": {"lambda": LAMBDAS},
    "ties": {"density": [0.1, 0.2, 0.5], "lambda": TIES_LAMBDAS},
    "tsv": {"alpha": ALPHAS},
    "iso_c": {"alpha": ALPHAS},
    "iso_cts": {"alpha": ALPHAS, "common_space_fraction": [0.5, 0.8]},
    "wudi": {"alpha": ALPHAS},
    "consensus_task_arithmetic": {"lambda": LAMBDAS, "tall_mask_lambda": [0.2, 0.4, 0.6]},
    "consensus_ties": {
        "density": [0.2],
        "lambda": TIES_LAMBDAS,
        "tall_mask_lambda": [0.2, 0.4, 0.6],
    },
    "localize_stitch": {
        "sparsity": [0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0],
        "lambda": [0.5, 1.0, 1.5, 2.0],
    },
    "task_arithmetic_svc": {"lambda": LAMBDAS + [1.5, 2.0], "svc_alpha": [1.0]},
    "tsv_svc": {"alpha": ALPHAS, "svc_alpha": [1.0]},
}


def accuracies(
    merged: dict[str, torch.Tensor], split: str, hidden: int, depth: int
) -> dict[str, float]:
    build, data = BENCH._task("build_model"), BENCH._task("data")
    score = BENCH._digits("accuracy")
    result = {}
    for task in TASKS:
        model = build(task, hidden, depth)
        model.load_state_dict(task_state_dict(merged, task))
        result[task] = score(model, data(split, task))
    result["average"] = sum(result[t] for t in TASKS) / len(TASKS)
    return result


def localize_stitch(models: dict[str, dict[str, torch.Tensor]], params: dict[str, Any]):
    """The merge-cli method's functions on the trunks (the heads stay out of the masks)."""
    base = models["base"]
    names = [n for n in base if not is_head(n, BENCH.HEADS)]
    trunk = {n: base[n] for n in names}
    checkpoints = [InMemoryCheckpoint({n: models[t][n] for n in names}) for t in TASKS]
    thresholds = global_thresholds(
        InMemoryCheckpoint(trunk), checkpoints, names, params["sparsity"]
    )
    merged = {
        n: stitch(
            base[n].clone(),
            [models[t][n] - base[n] for t in TASKS],
            thresholds.tolist(),
            params["lambda"],
        )
        for n in names
    }
    return BENCH.with_task_heads(merged, models)


def merge(method: str, models: dict[str, dict[str, torch.Tensor]], params: dict[str, Any]):
    if method == "localize_stitch":
        return localize_stitch(models, params)
    return BENCH.per_tensor_merge(method, models, params)


def tune(method: str, models, hidden: int, depth: int) -> tuple[dict[str, Any], dict[str, float]]:
    """The grid point with the best average validation accuracy, and its test accuracies."""
    grid = GRIDS[method]
    best: tuple[float, dict[str, Any]] | None = None
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values, strict=True))
        score = accuracies(merge(method, models, params), "val", hidden, depth)["average"]
        if best is None or score > best[0]:
            best = (score, params)
    assert best is not None
    return best[1], accuracies(merge(method, models, best[1]), "test", hidden, depth)


def regmean(paths: dict[str, Path], root: Path, hidden: int, depth: int) -> dict[str, float]:
    out = root / "merged" / "regmean"
    parsed = recipe_from_dict(BENCH.recipe(paths, "regmean", out, hidden, depth))
    result = run(parsed, RunOptions(overwrite=True))
    return accuracies(read_state_dict(open_checkpoint(str(result.output))), "test", hidden, depth)


def benchmark(root: Path, seed: int, hidden: int = 128, depth: int = 2) -> dict[str, Any]:
    paths = BENCH.make_models(root, hidden, depth, seed=seed)
    models = BENCH.states(paths)
    results: dict[str, dict[str, float]] = {}
    chosen: dict[str, dict[str, Any]] = {}
    individual = {t: BENCH.accuracy(models[t], t, hidden, depth) for t in TASKS}
    individual["average"] = sum(individual.values()) / len(TASKS)
    results["individual"] = individual
    results["regmean"] = regmean(paths, root, hidden, depth)
    seconds = {}
    for method in GRIDS:
        started = time.perf_counter()
        chosen[method], results[method] = tune(method, models, hidden, depth)
        seconds[method] = round(time.perf_counter() - started, 1)
    return {"results": results, "chosen": chosen, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/multitask"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    runs = []
    for index, seed in enumerate(args.seeds):
        root = args.out if index == 0 else args.out / "seeds" / str(seed)
        outcome = benchmark(root, seed)
        runs.append(outcome["results"])
        print(f"seed {seed} (test accuracy, %; hyper-parameters chosen on validation):")
        print(BENCH.table(outcome["results"]))
        print("chosen:", outcome["chosen"])
        print("seconds (grid search):", outcome["seconds"], "\n", flush=True)
    if len(runs) > 1:
        print(f"mean over seeds {args.seeds}:")
        print(BENCH.table(BENCH.mean_results(runs)))


if __name__ == "__main__":
    main()
