"""Fixtures for the alignment tests: architectures, trained digits pairs, spec builders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merge_cli.task import load_module

HERE = Path(__file__).resolve().parent
MODELS_FILE = HERE / "models.py"
REPO = HERE.parents[1]


@pytest.fixture(scope="session")
def test_models():
    """tests/align/models.py: build_cnn, build_resnet, image_data, randomize_norms."""
    return load_module(MODELS_FILE)


@pytest.fixture(scope="session")
def align_digits():
    """scripts/align_digits.py: training, path metrics and the results table."""
    return load_module(REPO / "scripts" / "align_digits.py")


@pytest.fixture(scope="session")
def digits_pairs(align_digits) -> dict[bool, list[dict[str, torch.Tensor]]]:
    """Two plain and two BatchNorm MLPs (3 x 256 hidden) trained from different seeds."""
    return {batchnorm: align_digits.train_pair(batchnorm, epochs=5) for batchnorm in (False, True)}


@pytest.fixture(scope="session")
def digits_pair_files(tmp_path_factory, align_digits, digits_pairs) -> dict[str, Path]:
    """The trained pairs as safetensors files: mlp_a, mlp_b, bn_a, bn_b."""
    return align_digits.save_pairs(digits_pairs, tmp_path_factory.mktemp("digits_pairs"))
