"""On real data: aligning two independently trained digits MLPs removes the loss barrier."""

from __future__ import annotations

import pytest

# make test-fast skips these: the module trains the digits MLPs and CNNs it aligns
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows(align_digits, digits_pairs):
    table = align_digits.results(digits_pairs)
    print("\n" + align_digits.table(table))
    return {(row["network"], row["method"]): row for row in table}


def test_endpoints_are_trained(rows):
    for network in ("MLP", "BN-MLP"):
        for end in ("a", "b"):
            assert rows[network, f"endpoint {end}"]["acc"] > 0.9


@pytest.mark.parametrize("method", ["weight_matching", "activation_matching", "sinkhorn"])
def test_alignment_removes_most_of_the_barrier(rows, method):
    naive, aligned = rows["MLP", "naive average"], rows["MLP", method]
    assert naive["barrier"] > 0.5
    assert aligned["barrier"] < naive["barrier"] / 4
    assert aligned["loss"] < naive["loss"] / 2
    assert aligned["acc"] > naive["acc"] + 0.2


def test_zipit_midpoint_is_a_working_model(rows):
    assert rows["MLP", "zipit"]["acc"] > rows["MLP", "naive average"]["acc"] + 0.2
    assert rows["MLP", "zipit"]["loss"] < rows["MLP", "naive average"]["loss"] / 2


@pytest.mark.parametrize("method", ["weight_matching", "activation_matching"])
def test_repair_improves_the_aligned_midpoint(rows, method):
    for network in ("MLP", "BN-MLP"):
        assert rows[network, f"{method} + REPAIR"]["loss"] < rows[network, method]["loss"]
    # BatchNorm networks: resetting the statistics is what makes the average work
    assert rows["BN-MLP", f"{method} + REPAIR"]["loss"] < rows["BN-MLP", method]["loss"] * 0.8 or (
        rows["BN-MLP", f"{method} + REPAIR"]["acc"] >= 0.95
    )


def test_partial_zip_rows_span_ensemble_to_full_zip(rows):
    partial = [rows["MLP", f"zipit, first {k} layer(s) zipped"] for k in (1, 2)]
    ensemble = rows["MLP", "ensemble of a, b"]
    for row in (ensemble, *partial):
        assert row["acc"] > rows["MLP", "naive average"]["acc"] + 0.2
    # zipping fewer layers keeps more of each model: never worse than the full zip by much
    assert partial[0]["loss"] <= rows["MLP", "zipit"]["loss"] + 0.05
