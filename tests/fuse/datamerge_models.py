"""Tiny task models for the data-aware merging tests (Fisher, RegMean, AdaMerging).

Models follow ``recipes/tasks/multitask.py:build_model`` (``trunk.*`` + a task ``head``).
``GAUSS_TASK`` is a task file with full-rank Gaussian inputs, so Gram matrices are
invertible and a hand computation of the papers' formulas needs no regularisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import single_thread

REPO = Path(__file__).resolve().parents[2]
TASK_FILE = REPO / "recipes" / "tasks" / "multitask.py"
HEADS = r"re:^head\."

GAUSS_TASK = """
import pytest
import torch

CLASSES = {"digits": 10, "parity": 2, "ge5": 2, "mod3": 3, "wine": 3}


def data(split, task="parity", batch_size=16, n=48):
    generator = torch.Generator().manual_seed(sum(map(ord, split + task)))
    x = torch.randn(n, 64, generator=generator)
    y = (x[:, :8].sum(1) > 0).long() if CLASSES[task] == 2 else x[:, :4].argmax(1) % CLASSES[task]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]
"""


def build(task: str, hidden: int = 8, depth: int = 1) -> torch.nn.Module:
    from merge_cli.task import load_callable

    return load_callable(f"{TASK_FILE}:build_model", "test")(task, hidden, depth)


def gauss_task_file(root: Path) -> Path:
    path = root / "gauss_task.py"
    if not path.exists():
        path.write_text(GAUSS_TASK)
    return path


def gauss_data(root: Path, split: str, task: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from merge_cli.task import load_callable

    return load_callable(f"{gauss_task_file(root)}:data", "test")(split, task)


def save(model: torch.nn.Module, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    return path


def task_models(
    root: Path, tasks: dict[str, str], hidden: int = 8, depth: int = 1, scale: float = 0.3
) -> dict[str, Path]:
    """A random base (10-class head) and, per model, its trunk plus noise and its own head."""
    torch.manual_seed(0)
    base = build("digits", hidden, depth)
    paths = {"base": save(base, root / "base")}
    for index, (name, task) in enumerate(tasks.items()):
        torch.manual_seed(index + 1)
        model = build(task, hidden, depth)
        with torch.no_grad():
            for value, source in zip(
                model.trunk.state_dict().values(), base.trunk.state_dict().values(), strict=True
            ):
                value.copy_(source + scale * torch.randn_like(source))
        paths[name] = save(model, root / name)
    return paths


def recipe(
    root: Path,
    paths: dict[str, Path],
    tasks: dict[str, str],
    method: str,
    out: Path,
    hidden: int = 8,
    depth: int = 1,
    **params: Any,
) -> dict[str, Any]:
    """A recipe merging ``tasks``'s models, each with its own Gaussian task and head."""

    def task(name: str) -> dict[str, Any]:
        return {
            "model": f"{TASK_FILE}:build_model",
            "data": f"{gauss_task_file(root)}:data",
            "params": {"task": name, "hidden": hidden, "depth": depth},
        }

    models: dict[str, Any] = {"base": {"path": str(paths["base"]), "task": task("digits")}}
    models.update({name: {"path": str(paths[name]), "task": task(t)} for name, t in tasks.items()})
    return {
        "models": models,
        "fuse": {
            "method": method,
            "base": "base",
            "models": list(tasks),
            "params": {"heads": HEADS, **params},
        },
        "save": {"path": str(out), "model_card": False},
    }


def state(path: Path) -> dict[str, torch.Tensor]:
    from merge_cli.io import open_checkpoint
    from merge_cli.io.checkpoint import read_state_dict

    return read_state_dict(open_checkpoint(str(path)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run several times faster on one thread than on a loaded shared CPU."""
    with single_thread():
        yield
