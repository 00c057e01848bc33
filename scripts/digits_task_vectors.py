"""Task arithmetic and TIES on real data: one pre-trained digits MLP, three fine-tunes.

The experiment of Ilharco et al. 2023 and Yadav et al. 2023 in miniature, on scikit-learn's
handwritten digits (recipes/tasks/digits.py):

* **pre-training**: a 10-way MLP trained briefly on a small slice of the training images;
* **fine-tuning**: three copies, each trained on the images of one group of digits
  ({0,1,2,3}, {4,5,6}, {7,8,9}) plus a replay of the pre-training slice (so the data is
  reweighted toward the group while the 10-way head stays shared); each becomes the
  expert of its group;
* **merging**: task arithmetic and TIES through merge-cli's streaming pipeline, with
  ``lambda`` chosen on the validation split (as the papers do);
* **reporting**: accuracy on each group's test images, and *normalized accuracy*
  (merged accuracy / the group's own fine-tune's accuracy).

    python scripts/digits_task_vectors.py [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from merge_cli.task import load_module

REPO = Path(__file__).resolve().parents[1]
GROUPS = {"0-3": (0, 1, 2, 3), "4-6": (4, 5, 6), "7-9": (7, 8, 9)}
LAMBDAS = (0.4, 0.6, 0.8, 1.0, 1.2, 1.5)
METHODS = {"task_arithmetic": {}, "ties": {"density": 0.3}}
ARCH = {"hidden": 128, "depth": 2}
#: Pre-training uses only this many training images: the pre-trained model is fair, not good.
PRETRAIN_IMAGES = 150


def _digits():
    return load_module(REPO / "recipes" / "tasks" / "digits.py")


def _group_batches(split: str, classes: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images, labels = _digits().split_arrays(split)
    keep = torch.isin(labels, torch.tensor(classes))
    images, labels = images[keep], labels[keep]
    return [(images[i : i + 128], labels[i : i + 128]) for i in range(0, len(labels), 128)]


def _train_models(workdir: Path) -> dict[str, Path]:
    digits = _digits()
    torch.manual_seed(0)
    pretrained = digits.build_mlp(**ARCH)
    images, labels = digits.split_arrays("train")
    replay = images[:PRETRAIN_IMAGES], labels[:PRETRAIN_IMAGES]
    digits.train(pretrained, [replay], epochs=15, lr=1e-3, seed=0)
    paths = {"pretrained": workdir / "pretrained.safetensors"}
    save_file(dict(pretrained.state_dict()), str(paths["pretrained"]))
    for i, (group, classes) in enumerate(GROUPS.items()):
        model = digits.build_mlp(**ARCH)
        model.load_state_dict(pretrained.state_dict())
        data = [*_group_batches("train", classes), replay]
        digits.train(model, data, epochs=8, lr=1e-3, seed=i + 1)
        paths[group] = workdir / f"finetuned_{group}.safetensors"
        save_file(dict(model.state_dict()), str(paths[group]))
    return paths


def _accuracies(path: Path, split: str) -> dict[str, float]:
    from safetensors.torch import load_file

    digits = _digits()
    model = digits.build_mlp(**ARCH)
    model.load_state_dict(load_file(str(path)))
    return {g: digits.accuracy(model, _group_batches(split, c)) for g, c in GROUPS.items()}


def _merge(paths: dict[str, Path], method: str, params: dict[str, Any], out: Path) -> Path:
    from merge_cli.config import recipe_from_dict
    from merge_cli.pipeline import run

    recipe = recipe_from_dict(
        {
            "models": {name: str(path) for name, path in paths.items()},
            "fuse": {"method": method, "base": "pretrained", "params": params},
            "save": {"path": str(out), "dtype": "float32", "model_card": False},
        }
    )
    output = run(recipe).output
    assert output is not None
    return output / "model.safetensors"


@contextlib.contextmanager
def _one_thread():
    """Tiny models train faster on one thread (and identically on any machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_experiment(
    workdir: Path, lambdas: dict[str, tuple[float, ...]] | None = None
) -> dict[str, Any]:
    """Train, merge and evaluate; returns test accuracies per model and per task group.

    ``lambdas`` are the candidates per method (default: :data:`LAMBDAS` for each); the one
    with the best mean normalized accuracy on the validation split is used.
    """
    with _one_thread():
        paths = _train_models(workdir)
    results: dict[str, Any] = {"lambda": {}}
    results["pretrained"] = _accuracies(paths["pretrained"], "test")
    results["finetuned"] = {g: _accuracies(paths[g], "test")[g] for g in GROUPS}
    fine_val = {g: _accuracies(paths[g], "val")[g] for g in GROUPS}
    for method, params in METHODS.items():
        best = None
        for scale in (lambdas or {}).get(method, LAMBDAS):
            merged = _merge(
                paths, method, {**params, "lambda": scale}, workdir / f"{method}-{scale}"
            )
            val = _accuracies(merged, "val")
            score = sum(val[g] / fine_val[g] for g in GROUPS) / len(GROUPS)
            if best is None or score > best[0]:
                best = (score, scale, merged)
        assert best is not None
        results["lambda"][method] = best[1]
        results[method] = _accuracies(best[2], "test")
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """Accuracy per task group, and normalized accuracy (merged / its own fine-tune)."""
    fine = results["finetuned"]
    lines = [
        "| model | " + " | ".join(f"digits {g}" for g in GROUPS) + " | mean normalized |",
        "|---|" + "---|" * (len(GROUPS) + 1),
    ]

    def row(name: str, accuracies: dict[str, float]) -> str:
        cells = [f"{accuracies[g]:.3f} ({accuracies[g] / fine[g]:.2f})" for g in GROUPS]
        mean = sum(accuracies[g] / fine[g] for g in GROUPS) / len(GROUPS)
        return f"| {name} | " + " | ".join(cells) + f" | {mean:.2f} |"

    lines.append(row("pre-trained", results["pretrained"]))
    lines.append(row("fine-tuned on the group itself", fine))
    for method in METHODS:
        lines.append(row(f"{method} (lambda {results['lambda'][method]})", results[method]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="keep the checkpoints in this directory")
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        results = run_experiment(args.out)
    else:
        with tempfile.TemporaryDirectory() as workdir:
            results = run_experiment(Path(workdir))
    print("Test accuracy on each digit group (normalized accuracy in parentheses):\n")
    print(markdown_table(results))


if __name__ == "__main__":
    main()
