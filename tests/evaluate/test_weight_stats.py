"""weight_stats against hand-computed norms, cosines and sign conflicts."""

import math

import pytest
import torch

from merge_cli.evaluate.weight_stats import tensor_group, weight_statistics
from merge_cli.io import InMemoryCheckpoint


def _checkpoints():
    base = {
        "layers.0.weight": torch.ones(2, 2),
        "layers.1.weight": torch.zeros(3),
        "head.weight": torch.zeros(2),
        "steps": torch.tensor(4),
    }
    a = {
        "layers.0.weight": torch.tensor([[2.0, 1.0], [1.0, 1.0]]),
        "layers.1.weight": torch.tensor([1.0, -1.0, 0.0]),
        "head.weight": torch.tensor([3.0, 4.0]),
        "steps": torch.tensor(9),
    }
    b = {
        "layers.0.weight": torch.tensor([[0.0, 1.0], [1.0, 1.0]]),
        "layers.1.weight": torch.tensor([1.0, 1.0, 2.0]),
        "head.weight": torch.tensor([0.0, 5.0]),
        "steps": torch.tensor(9),
    }
    return base, a, b  # fmt: skip


@pytest.mark.parametrize("chunk_bytes", [8, 2**20])
def test_task_vector_statistics_hand_computed(chunk_bytes):
    base, a, b = (InMemoryCheckpoint(s) for s in _checkpoints())
    stats = weight_statistics({"a": a, "b": b}, base, chunk_bytes=chunk_bytes)
    assert stats["of"] == "task vectors"
    layers = stats["layers"]
    assert set(layers) == {"layers.0", "layers.1", "head"}
    # layers.0: tau_a = [1, 0, 0, 0], tau_b = [-1, 0, 0, 0]: opposite, one conflict of 4
    assert layers["layers.0"]["cosine"]["a · b"] == pytest.approx(-1.0)
    assert layers["layers.0"]["sign_conflicts"] == 0.25
    # layers.1: tau_a = [1, -1, 0], tau_b = [1, 1, 2]: dot 0; conflict at index 1 only
    assert layers["layers.1"]["cosine"]["a · b"] == 0.0
    assert layers["layers.1"]["sign_conflicts"] == pytest.approx(1 / 3)
    assert layers["layers.1"]["norm"] == pytest.approx({"a": math.sqrt(2), "b": math.sqrt(6)})
    # head: tau = [3, 4] and [0, 5]: cosine 20 / (5 * 5)
    assert layers["head"]["cosine"]["a · b"] == pytest.approx(0.8)
    overall = stats["overall"]
    # all tensors: tau_a = [1,0,0,0, 1,-1,0, 3,4], tau_b = [-1,0,0,0, 1,1,2, 0,5]
    assert overall["norm"]["a"] == pytest.approx(math.sqrt(1 + 1 + 1 + 9 + 16))
    assert overall["norm"]["b"] == pytest.approx(math.sqrt(1 + 1 + 1 + 4 + 25))
    assert overall["cosine"]["a · b"] == pytest.approx((-1 + 1 - 1 + 20) / (28**0.5 * 32**0.5))
    assert overall["sign_conflicts"] == pytest.approx(2 / 9)


def test_without_a_base_the_statistics_are_of_the_weights():
    _, a, b = (InMemoryCheckpoint(s) for s in _checkpoints())
    stats = weight_statistics({"a": a, "b": b}, None)
    assert stats["of"] == "weights" and "sign_conflicts" not in stats["overall"]
    assert stats["layers"]["head"]["cosine"]["a · b"] == pytest.approx(0.8)
    assert stats["layers"]["layers.0"]["norm"]["a"] == pytest.approx(math.sqrt(7))


def test_tensor_groups():
    assert tensor_group("model.layers.3.self_attn.q_proj.weight") == "layers.3"
    assert tensor_group("model.embed_tokens.weight") == "model.embed_tokens"
    assert tensor_group("bias") == "bias"
