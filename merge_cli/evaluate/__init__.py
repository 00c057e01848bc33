"""Evaluate stage: metrics on inputs, the merged model and paths between models.

``METRICS`` maps ``evaluate[].metric`` names to their entries
(:class:`~merge_cli.evaluate.registry.Metric`). Adding a metric: write a function and a
``Metric`` entry in a module here, then list it in ``_ENTRIES`` below.
"""

from __future__ import annotations

from merge_cli.evaluate.barrier import BARRIER
from merge_cli.evaluate.perplexity import PERPLEXITY
from merge_cli.evaluate.registry import Metric
from merge_cli.evaluate.task_metrics import ACCURACY, LOSS
from merge_cli.evaluate.weight_stats import WEIGHT_STATS

_ENTRIES = [LOSS, ACCURACY, PERPLEXITY, BARRIER, WEIGHT_STATS]

#: Every available metric by name.
METRICS: dict[str, Metric] = {metric.name: metric for metric in _ENTRIES}


__all__ = ["METRICS", "Metric"]
