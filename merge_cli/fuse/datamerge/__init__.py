"""Data-aware whole-model methods: they load the models and the task's data (Fisher,
RegMean, AdaMerging, greedy soups, curve training). Shared pieces: ``model_data`` (parameters,
examples), ``heads`` (task-specific heads), ``stats_cache`` (statistics cached on disk)."""

from __future__ import annotations

from merge_cli.engine.method import ModelMethod
from merge_cli.fuse.datamerge import adamerging, curve, fisher, greedy_soup, regmean

#: Every data-aware whole-model method by name.
DATA_METHODS: dict[str, ModelMethod] = {
    method.name: method
    for method in (
        fisher.METHOD,
        regmean.METHOD,
        adamerging.METHOD,
        greedy_soup.METHOD,
        curve.METHOD,
    )
}
