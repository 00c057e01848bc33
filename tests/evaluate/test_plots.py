"""Path plots: both barriers drawn and named on their own panel, legends outside the data,
shared t axis, a 300-dpi PNG and a vector PDF."""

from __future__ import annotations

import struct

import pytest

from merge_cli.evaluate.plots import PNG_DPI, barrier_gap, path_figure, plot_paths

POINTS = [0.0, 0.25, 0.5, 0.75, 1.0]
PATHS = {
    "linear": {"loss": [0.1, 0.6, 1.1, 0.5, 0.3], "accuracy": [0.98, 0.7, 0.4, 0.8, 0.96]},
    "curve": {"loss": [0.1, 0.15, 0.2, 0.2, 0.3], "accuracy": [0.98, 0.97, 0.96, 0.95, 0.96]},
}


def test_barrier_gap_is_the_largest_distance_from_the_chord():
    index, height = barrier_gap(POINTS, PATHS["linear"]["loss"], 1.0)
    assert index == 2 and height == pytest.approx(1.1 - 0.2)
    index, height = barrier_gap(POINTS, PATHS["linear"]["accuracy"], -1.0)
    assert index == 2 and height == pytest.approx(0.97 - 0.4)
    _, height = barrier_gap(POINTS, [0.5, 0.2, 0.1, 0.1, 0.1], 1.0)  # all below the chord
    assert height == pytest.approx(0.0, abs=1e-12)


def test_each_panel_names_its_own_barrier_below_the_axes():
    import matplotlib.pyplot as plt

    figure = path_figure(POINTS, PATHS, "a ↔ b, b aligned to a by weight_matching")
    try:
        loss_axis, accuracy_axis = figure.axes
        assert loss_axis.get_shared_x_axes().joined(loss_axis, accuracy_axis)
        loss_labels = [t.get_text() for t in loss_axis.get_legend().get_texts()]
        accuracy_labels = [t.get_text() for t in accuracy_axis.get_legend().get_texts()]
        assert loss_labels == ["linear (loss barrier 0.900)", "curve (loss barrier 0.000)"]
        assert accuracy_labels == ["linear (error barrier 0.570)", "curve (error barrier 0.015)"]
        for axis in figure.axes:  # the legend sits below the axes, off the data
            anchor = axis.get_legend().get_bbox_to_anchor().transformed(axis.transAxes.inverted())
            assert anchor.y1 < 0
            assert len(axis.collections) == len(PATHS)  # one barrier segment per path
        segment = accuracy_axis.collections[0].get_segments()[0]
        assert segment[:, 0].tolist() == [0.5, 0.5]
        assert sorted(segment[:, 1].tolist()) == pytest.approx([0.4, 0.97])
        assert "aligned to a by weight_matching" in figure._suptitle.get_text()
    finally:
        plt.close(figure)


def test_plot_paths_writes_a_300_dpi_png_and_a_pdf(tmp_path):
    png = plot_paths(POINTS, PATHS, "a ↔ b", tmp_path / "plots" / "barrier_a_b.png")
    assert png == tmp_path / "plots" / "barrier_a_b.png"
    assert (tmp_path / "plots" / "barrier_a_b.pdf").read_bytes()[:5] == b"%PDF-"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    phys = data.index(b"pHYs")
    per_metre = struct.unpack(">I", data[phys + 4 : phys + 8])[0]
    assert per_metre == pytest.approx(PNG_DPI / 0.0254, rel=1e-3)
    width = struct.unpack(">I", data[16:20])[0]
    assert width > 7.0 * PNG_DPI * 0.8  # 7-inch figure (trimmed to its contents) at 300 dpi
