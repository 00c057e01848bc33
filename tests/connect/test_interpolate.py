import pytest
import torch

from merge_cli.connect.interpolate import interpolate_state_dicts, loss_barrier, path_points


def test_interpolation_is_hand_computed_and_keeps_integer_tensors():
    a = {
        "w": torch.tensor([0.0, 2.0]),
        "h": torch.tensor([1.0], dtype=torch.bfloat16),
        "steps": torch.tensor(7),
    }
    b = {
        "w": torch.tensor([4.0, -2.0]),
        "h": torch.tensor([3.0], dtype=torch.bfloat16),
        "steps": torch.tensor(9),
    }
    mid = interpolate_state_dicts(a, b, 0.25)
    assert torch.equal(mid["w"], torch.tensor([1.0, 1.0]))
    assert mid["h"].dtype == torch.bfloat16 and float(mid["h"]) == 1.5
    assert int(mid["steps"]) == 7
    assert torch.equal(interpolate_state_dicts(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate_state_dicts(a, b, 1.0)["w"], b["w"])


def test_loss_barrier_is_the_largest_excess_over_the_endpoint_line():
    assert path_points(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    # line through 1 and 2: 1.25 at t=0.25, 1.5 at 0.5, 1.75 at 0.75
    assert loss_barrier([1.0, 2.0, 4.0, 1.75, 2.0]) == pytest.approx(2.5)
    assert loss_barrier([1.0, 0.5, 2.0]) == 0.0  # below the line: no barrier
    with pytest.raises(ValueError):
        loss_barrier([1.0])
