"""Plots of metrics along paths in weight space, ready for a paper: vector PDF and 300-dpi PNG.

Two panels share the ``t`` axis: the loss and the accuracy along each path (linear, curve).
On each panel every path shows its barrier as in Frankle et al. 2020 and Entezari et al.
2022: the dashed chord between the path's end points and a vertical segment where the curve
is farthest from it (above the chord for the loss, below it for the accuracy, whose gap is
the error barrier). Each panel's legend names the paths with that panel's barrier, below the
axes so it never covers data. matplotlib with the Agg backend: no display needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from merge_cli.errors import OutputError

#: Panels: (key in the path's values, axis label, name of its barrier, sign of the gap).
PANELS = (("loss", "loss", "loss barrier", 1.0), ("accuracy", "accuracy", "error barrier", -1.0))
#: Raster resolution of the PNG (the PDF is vector).
PNG_DPI = 300


def barrier_gap(points: list[float], values: list[float], sign: float) -> tuple[int, float]:
    """Index and height of the largest gap ``sign * (value - chord)`` between a path's
    values and the chord between its end points (height 0 at an end when none is above)."""
    t0, t1 = points[0], points[-1]
    span = (t1 - t0) or 1.0
    gaps = [
        sign * (v - (values[0] + (values[-1] - values[0]) * (t - t0) / span))
        for t, v in zip(points, values, strict=True)
    ]
    index = max(range(len(gaps)), key=gaps.__getitem__)
    return index, max(gaps[index], 0.0)


def path_figure(points: list[float], paths: dict[str, dict[str, list[float]]], title: str) -> Any:
    """The figure (not saved): loss and accuracy against ``t`` for each path (``{"linear":
    {"loss": [...], "accuracy": [...]}, "curve": ...}``), barriers drawn and named."""
    # Imported here: matplotlib takes half a second to import, and most runs never plot.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": 9, "axes.titlesize": 9, "legend.fontsize": 8}):
        figure, axes = plt.subplots(1, 2, figsize=(7.0, 3.0), sharex=True)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for axis, (key, axis_label, barrier_name, sign) in zip(axes, PANELS, strict=True):
            for index, (path_name, values) in enumerate(paths.items()):
                color = colors[index % len(colors)]
                curve = values[key]
                at, height = barrier_gap(points, curve, sign)
                axis.plot(
                    points,
                    curve,
                    marker="o",
                    markersize=3,
                    color=color,
                    label=f"{path_name} ({barrier_name} {height:.3f})",
                )
                axis.plot([points[0], points[-1]], [curve[0], curve[-1]], "--", color=color, lw=0.8)
                chord = curve[at] - sign * height
                low, high = sorted((chord, curve[at]))
                axis.vlines(points[at], low, high, color=color, linestyles=":", lw=1.5)
            axis.set_xlabel("t (position on the path)")
            axis.set_ylabel(axis_label)
            axis.set_xlim(points[0], points[-1])
            axis.grid(alpha=0.3)
            axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
        figure.suptitle(title)
        figure.tight_layout()
    return figure


def plot_paths(
    points: list[float],
    paths: dict[str, dict[str, list[float]]],
    title: str,
    target: Path,
) -> Path:
    """:func:`path_figure` saved as a PNG at ``target`` and, for papers, as a vector PDF
    beside it (same name, ``.pdf``); returns the PNG's path (the report's plot)."""
    figure = path_figure(points, paths, title)  # (selects the Agg backend first)
    import matplotlib.pyplot as plt

    written = [target, target.with_suffix(".pdf")]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(written[0], format="png", dpi=PNG_DPI, bbox_inches="tight")
        figure.savefig(written[1], format="pdf", bbox_inches="tight")
    except OSError as error:
        raise OutputError(f"{target}: cannot write the plot ({error})") from error
    finally:
        plt.close(figure)
    return target
