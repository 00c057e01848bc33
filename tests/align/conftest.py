"""Fixtures for the alignment tests: architectures, trained digits pairs, spec builders."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
MODELS_FILE = HERE / "models.py"
REPO = HERE.parents[1]


def _load(path: Path, name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def test_models():
    """tests/align/models.py: build_cnn, build_resnet, image_data, randomize_norms."""
    return _load(MODELS_FILE, "merge_cli_tests_align_models")


@pytest.fixture(scope="session")
def align_digits():
    """scripts/align_digits.py: training, path metrics and the results table."""
    return _load(REPO / "scripts" / "align_digits.py", "merge_cli_scripts_align_digits")


@pytest.fixture(scope="session")
def digits_pairs(align_digits) -> dict[bool, list[dict[str, torch.Tensor]]]:
    """Two plain and two BatchNorm MLPs (3 x 256 hidden) trained from different seeds."""
    return {batchnorm: align_digits.train_pair(batchnorm, epochs=5) for batchnorm in (False, True)}


@pytest.fixture(scope="session")
def digits_pair_files(tmp_path_factory, align_digits, digits_pairs) -> dict[str, Path]:
    """The trained pairs as safetensors files: mlp_a, mlp_b, bn_a, bn_b."""
    return align_digits.save_pairs(digits_pairs, tmp_path_factory.mktemp("digits_pairs"))
