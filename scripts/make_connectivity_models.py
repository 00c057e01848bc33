"""Train the small digits MLPs that the connectivity and soup recipes use.

* ``mlp_a`` and ``mlp_b``: one architecture trained from two different random
  initialisations (seeds 1 and 2): two modes with a clear loss barrier on the straight line
  between them (recipes/connect/curve.yaml, recipes/evaluate/barrier.yaml).
* ``pretrained`` and ``ft0`` ... ``ft5``: a briefly trained model and six fine-tunes of it
  with different learning rates, epochs and data subsets — the last with a learning rate
  too high for a soup (recipes/connect/greedy_soup.yaml).

All are saved as safetensors files under the output directory; training is seeded.

    python scripts/make_connectivity_models.py examples/digits
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from merge_cli.task import load_module

REPO = Path(__file__).resolve().parents[1]
#: The MLP of the recipes (task.params there must match).
HIDDEN, DEPTH = 128, 2
#: (learning rate, epochs) of each fine-tune.
FINETUNES = [(1e-3, 10), (3e-3, 10), (5e-4, 20), (2e-3, 15), (1e-3, 25), (3e-2, 10)]


def digits_module():
    """recipes/tasks/digits.py, imported by path."""
    return load_module(REPO / "recipes" / "tasks" / "digits.py")


def _save(model: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def make_endpoints(out: Path, epochs: int = 30) -> dict[str, Path]:
    """Two MLPs trained from different initialisations: ``mlp_a`` (seed 1), ``mlp_b`` (seed 2)."""
    digits = digits_module()
    train = digits.data("train")
    paths = {}
    for name, seed in (("mlp_a", 1), ("mlp_b", 2)):
        torch.manual_seed(seed)
        model = digits.build_mlp(HIDDEN, DEPTH)
        digits.train(model, train, epochs=epochs, seed=seed)
        paths[name] = _save(model, out / f"{name}.safetensors")
    return paths


def make_finetunes(out: Path, pretrain_epochs: int = 5) -> dict[str, Path]:
    """A briefly trained ``pretrained`` MLP and its fine-tunes ``ft0``..``ft5``, each on a
    seeded 70 % subset of the training split with its own learning rate and epochs."""
    digits = digits_module()
    train = digits.data("train")
    torch.manual_seed(0)
    pretrained = digits.build_mlp(HIDDEN, DEPTH)
    digits.train(pretrained, train, epochs=pretrain_epochs, seed=0)
    paths = {"pretrained": _save(pretrained, out / "pretrained.safetensors")}
    images = torch.cat([x for x, _ in train])
    labels = torch.cat([y for _, y in train])
    for i, (lr, epochs) in enumerate(FINETUNES):
        model = digits.build_mlp(HIDDEN, DEPTH)
        model.load_state_dict(pretrained.state_dict())
        generator = torch.Generator().manual_seed(100 + i)
        subset = torch.randperm(len(labels), generator=generator)[: int(0.7 * len(labels))]
        batches = [
            (images[subset[j : j + 128]], labels[subset[j : j + 128]])
            for j in range(0, len(subset), 128)
        ]
        digits.train(model, batches, epochs=epochs, lr=lr, seed=i + 1)
        paths[f"ft{i}"] = _save(model, out / f"ft{i}.safetensors")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the models to")
    args = parser.parse_args()
    paths = {**make_endpoints(args.out), **make_finetunes(args.out)}
    print(f"wrote {', '.join(paths)} under {args.out}")


if __name__ == "__main__":
    main()
