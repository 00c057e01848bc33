"""PNG plots of metrics along paths in weight space (matplotlib, Agg backend: no display)."""

from __future__ import annotations

from pathlib import Path

from merge_cli.errors import OutputError


def plot_paths(
    points: list[float],
    paths: dict[str, dict[str, list[float]]],
    title: str,
    target: Path,
) -> Path:
    """Loss and accuracy against ``t`` for each path (``{"linear": {"loss": [...],
    "accuracy": [...]}, "curve": ...}``), side by side, saved as a PNG at ``target``."""
    # Imported here: matplotlib takes half a second to import, and most runs never plot.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    try:
        for path_name, values in paths.items():
            for axis, key in zip(axes, ("loss", "accuracy"), strict=True):
                axis.plot(points, values[key], marker="o", markersize=3, label=path_name)
        for axis, key in zip(axes, ("loss", "accuracy"), strict=True):
            axis.set_xlabel("t (position on the path)")
            axis.set_ylabel(key)
            axis.grid(alpha=0.3)
            axis.legend()
        figure.suptitle(title)
        figure.tight_layout()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(target, format="png", dpi=100)
        except OSError as error:
            raise OutputError(f"{target}: cannot write the plot ({error})") from error
    finally:
        plt.close(figure)
    return target
