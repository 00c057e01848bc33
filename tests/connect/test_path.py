import pytest
import torch

from merge_cli.connect.path import curve_coefficients, curve_point


@pytest.mark.parametrize(
    ("kind", "t", "expected"),
    [
        ("bezier", 0.0, (1.0, 0.0, 0.0)),
        ("bezier", 0.5, (0.25, 0.5, 0.25)),
        ("bezier", 1.0, (0.0, 0.0, 1.0)),
        ("polychain", 0.25, (0.5, 0.5, 0.0)),
        ("polychain", 0.5, (0.0, 1.0, 0.0)),
        ("polychain", 0.75, (0.0, 0.5, 0.5)),
    ],
)
def test_curve_coefficients(kind, t, expected):
    assert curve_coefficients(kind, t) == pytest.approx(expected)


def test_curve_point_hand_computed():
    start = {"w": torch.tensor([0.0]), "running_mean": torch.tensor([0.0]), "n": torch.tensor(3)}
    bend = {"w": torch.tensor([4.0])}  # parameters only
    end = {"w": torch.tensor([8.0]), "running_mean": torch.tensor([2.0]), "n": torch.tensor(5)}
    point = curve_point(start, bend, end, 0.5, "bezier")
    assert float(point["w"]) == 0.25 * 0 + 0.5 * 4 + 0.25 * 8
    assert float(point["running_mean"]) == 1.0  # not on the bend: linear
    assert int(point["n"]) == 3
    assert float(curve_point(start, bend, end, 0.25, "polychain")["w"]) == 2.0
    with pytest.raises(ValueError, match="unknown curve"):
        curve_coefficients("spline", 0.5)
