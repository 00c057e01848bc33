"""The lazy aligned view: reads (whole and by rows) equal the eagerly permuted tensors."""

from __future__ import annotations

import pytest
import torch

from merge_cli.align import permuted as permuted_module
from merge_cli.align.permuted import PermutedCheckpoint, UnitMap
from merge_cli.align.spec import AxisRef, Group, PermutationSpec, permute_state_dict
from merge_cli.io import InMemoryCheckpoint


class CountingCheckpoint(InMemoryCheckpoint):
    """Records the row ranges read."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.reads: list[tuple[str, tuple[int, int] | None]] = []

    def read(self, name, rows=None):
        self.reads.append((name, rows))
        return super().read(name, rows)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    state = {
        "up.weight": torch.randn(12, 5).to(torch.bfloat16),  # 4 units x block 3 on rows
        "up.bias": torch.randn(12),
        "down.weight": torch.randn(7, 12),
        "other": torch.randn(3),
    }
    group = Group(
        "g",
        4,
        (AxisRef("up.weight", 0, 3), AxisRef("up.bias", 0, 3), AxisRef("down.weight", 1, 3, "in")),
    )
    return state, PermutationSpec((group,))


def test_whole_and_row_reads_match_the_eager_permutation(setup):
    state, spec = setup
    perm = torch.tensor([2, 0, 3, 1])
    expected = permute_state_dict(state, spec, {"g": perm})
    source = CountingCheckpoint(state)
    view = PermutedCheckpoint(source, spec, {"g": UnitMap(permutation=perm)})
    for name in state:
        assert torch.equal(view.read(name), expected[name])
        assert view.read(name).dtype == state[name].dtype
        assert view.info(name) == source.info(name)
    source.reads.clear()
    assert torch.equal(view.read("up.weight", (4, 8)), expected["up.weight"][4:8])
    # rows 4..8 are units 1 (rows 3..5 -> source unit 0) and 2 (rows 6..8 -> source unit 3)
    assert source.reads == [("up.weight", (1, 3)), ("up.weight", (9, 11))]
    assert torch.equal(view.read("down.weight", (2, 5)), expected["down.weight"][2:5])


def test_many_runs_read_one_span(setup, monkeypatch):
    state, spec = setup
    monkeypatch.setattr(permuted_module, "MAX_RUNS", 1)
    source = CountingCheckpoint(state)
    perm = torch.tensor([2, 0, 3, 1])
    view = PermutedCheckpoint(source, spec, {"g": UnitMap(permutation=perm)})
    expected = permute_state_dict(state, spec, {"g": perm})
    assert torch.equal(view.read("up.weight", (0, 12)), expected["up.weight"])
    assert source.reads == [("up.weight", (0, 12))]


def test_soft_maps_act_as_out_and_in_matrices(setup):
    state, spec = setup
    out = torch.rand(4, 4)
    into = torch.rand(4, 4)
    view = PermutedCheckpoint(InMemoryCheckpoint(state), spec, {"g": UnitMap(None, out, into)})
    big_out, big_in = torch.kron(out, torch.eye(3)), torch.kron(into, torch.eye(3))
    torch.testing.assert_close(view.read("up.bias"), big_out @ state["up.bias"])
    torch.testing.assert_close(view.read("down.weight"), state["down.weight"] @ big_in.T)
    torch.testing.assert_close(
        view.read("down.weight", (1, 3)), (state["down.weight"] @ big_in.T)[1:3]
    )
    rows = view.read("up.weight", (3, 9))
    assert rows.dtype == torch.bfloat16
    torch.testing.assert_close(
        rows, (big_out @ state["up.weight"].float())[3:9].to(torch.bfloat16), atol=0, rtol=0
    )
    assert torch.equal(view.read("other"), state["other"])
