"""Evaluate stage: metrics on inputs, the merged model, ensembles and paths.

``METRICS`` maps ``evaluate[].metric`` names to their implementations.
"""

from __future__ import annotations

from typing import Any

#: Every available metric by name.
METRICS: dict[str, Any] = {}

#: Metrics from the design that are not built yet.
PLANNED: set[str] = {"loss", "accuracy", "perplexity", "barrier", "weight_stats"}
