"""The evaluate stage: runs a recipe's ``evaluate`` entries and writes the JSON report.

Called by the pipeline after the fuse stage (with the fused output as ``merged``), and for
``merge-cli eval`` on existing checkpoints (:func:`merge_cli.pipeline.run_evaluation`). The
report, ``evaluation.json``, and the plots go where a report path says, else into the merged
model's directory when there is one, else into ``save.path`` when it exists; with none of
these nothing is written (the results still come back as rows): a command never leaves
files in the current directory unasked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from merge_cli.errors import OutputError
from merge_cli.evaluate import METRICS
from merge_cli.evaluate.registry import MERGED, EvalContext
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.resolve import open_checkpoint
from merge_cli.options import RunOptions
from merge_cli.recipe import Recipe
from merge_cli.task.ensemble import is_ensemble
from merge_cli.version import __version__

REPORT_NAME = "evaluation.json"


def default_report_path(recipe: Recipe, merged_path: Path | None) -> Path | None:
    """Where the report goes without an explicit path: beside the merged model, else in
    ``save.path`` when it is a directory, else nowhere (``None``)."""
    if merged_path is not None:
        return (merged_path if merged_path.is_dir() else merged_path.parent) / REPORT_NAME
    if recipe.save is not None and Path(recipe.save.path).is_dir():
        return Path(recipe.save.path) / REPORT_NAME
    return None


def evaluate_recipe(
    recipe: Recipe,
    checkpoints: dict[str, Checkpoint],
    merged_path: Path | None,
    options: RunOptions,
    report: Path | None = None,
) -> list[dict[str, Any]]:
    """Run every ``evaluate`` entry; return the table rows and write the report (and the
    plots) when there is somewhere to write it (:func:`default_report_path`)."""
    checkpoints = dict(checkpoints)
    ensembles = {}
    if merged_path is not None and is_ensemble(merged_path):
        ensembles[MERGED] = merged_path
    elif merged_path is not None:
        checkpoints[MERGED] = open_checkpoint(str(merged_path))
    report = report or default_report_path(recipe, merged_path)
    context = EvalContext(
        recipe,
        checkpoints,
        report.parent if report is not None else None,
        options.device,
        options.progress,
        ensembles,
    )
    rows: list[dict[str, Any]] = []
    entries = []
    for index, spec in enumerate(recipe.evaluate):
        metric = METRICS[spec.metric]
        params = metric.params.model_validate(spec.params)
        options.progress.note(f"evaluate[{index}]: {spec.metric}")
        result = metric.run(context, spec, params)
        rows += result.rows
        entries.append(
            {
                "metric": spec.metric,
                "spec": spec.model_dump(mode="json"),
                "rows": result.rows,
                "details": result.details,
                "plots": [str(plot) for plot in result.plots],
            }
        )
    if report is None:
        options.progress.note("no evaluation report written (--report FILE writes one)")
        return rows
    write_report(
        report,
        {
            "merge_cli": __version__,
            "merged": str(merged_path) if merged_path is not None else None,
            "rows": rows,
            "evaluations": entries,
        },
    )
    options.progress.note(f"evaluation report: {report}")
    return rows


def _finite(value: Any) -> Any:
    """NaN and infinities become null, so the report is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_report(path: Path, report: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_finite(report), indent=2, ensure_ascii=False) + "\n")
    except OSError as error:
        raise OutputError(f"{path}: cannot write the evaluation report ({error})") from error
