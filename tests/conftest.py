"""Shared fixtures: tiny real checkpoints built in tmp_path, and a CLI runner."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from merge_cli.task import load_module

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    return load_module(REPO / "scripts" / f"{name}.py")


@pytest.fixture(scope="session")
def example_models():
    """The module that builds tiny Llama checkpoints (scripts/make_example_models.py)."""
    return _load_script("make_example_models")


@pytest.fixture(scope="session")
def tiny_llamas(tmp_path_factory, example_models) -> dict[str, Path]:
    """Three tiny Llama checkpoints (base, math, code) as sharded HF directories. Read-only."""
    root = tmp_path_factory.mktemp("tiny_llamas")
    base = example_models.llama_state_dict(example_models.CONFIG, seed=0)
    paths = {}
    for name, state in (
        ("base", base),
        ("math", example_models.variant(base, seed=1, scale=0.05)),
        ("code", example_models.variant(base, seed=2, scale=0.05)),
    ):
        paths[name] = root / name
        example_models.save_hf_directory(state, paths[name], example_models.CONFIG)
    return paths


@pytest.fixture(scope="session")
def digits_task():
    """The digits task module (recipes/tasks/digits.py)."""
    return load_module(REPO / "recipes" / "tasks" / "digits.py")


class Cli:
    """Runs merge-cli in-process and returns (exit code, stdout, stderr)."""

    def __init__(self):
        self.runner = CliRunner()

    def __call__(self, *args: str):
        from merge_cli.cli import app

        result = self.runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def cli() -> Cli:
    return Cli()


def load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read through merge-cli's loader."""
    from merge_cli.io import open_checkpoint
    from merge_cli.io.checkpoint import read_state_dict

    return read_state_dict(open_checkpoint(str(path)))


@contextmanager
def single_thread():
    """Run torch on one thread: tiny models train many times faster without thread overhead
    (and the CI box is small)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def connectivity_models(tmp_path_factory) -> dict[str, Path]:
    """Digits MLPs of scripts/make_connectivity_models.py: ``mlp_a``/``mlp_b`` (two inits)
    and ``pretrained`` with its fine-tunes ``ft0``..``ft5``, as safetensors files. Read-only."""
    script = _load_script("make_connectivity_models")
    root = tmp_path_factory.mktemp("connectivity_models")
    with single_thread():
        return {**script.make_endpoints(root), **script.make_finetunes(root)}


@pytest.fixture
def one_thread():
    """Torch on one thread for this test (see :func:`single_thread`)."""
    with single_thread():
        yield
