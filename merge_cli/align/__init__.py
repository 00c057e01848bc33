"""Align stage: brings every model into the unit order (basis) of a reference model.

``ALIGNERS`` maps ``align.method`` names to their registry entries
(:class:`~merge_cli.align.registry.Aligner`); :mod:`merge_cli.align.stage` runs them.
"""

from __future__ import annotations

from merge_cli.align.activation_matching import ActivationMatchingParams, activation_matching
from merge_cli.align.registry import Aligner
from merge_cli.align.sinkhorn import SinkhornParams, sinkhorn
from merge_cli.align.weight_matching import WeightMatchingParams, weight_matching
from merge_cli.align.zipit import ZipItParams, zipit

#: Every available alignment method by name.
ALIGNERS: dict[str, Aligner] = {
    entry.name: entry
    for entry in (
        Aligner(
            "weight_matching",
            "Permute units to maximise the weights' inner product with the reference "
            "(coordinate descent over linear assignments).",
            "Ainsworth, Hayase & Srinivasa 2023, Git Re-Basin (ICLR)",
            weight_matching,
            WeightMatchingParams,
            needs_data=lambda _params: False,
        ),
        Aligner(
            "activation_matching",
            "Permute units to maximise the correlation of their activations on task data.",
            "Ainsworth, Hayase & Srinivasa 2023, Git Re-Basin (ICLR)",
            activation_matching,
            ActivationMatchingParams,
            needs_data=lambda _params: True,
        ),
        Aligner(
            "sinkhorn",
            "Soft alignment by entropy-regularised optimal transport (barycentric maps).",
            "Singh & Jaggi 2020, Model Fusion via Optimal Transport (NeurIPS)",
            sinkhorn,
            SinkhornParams,
            needs_data=lambda params: params.cost == "activations",
        ),
        Aligner(
            "zipit",
            "Merge correlated features within and across two models (fuse with uniform linear).",
            "Stoica et al. 2024, ZipIt! Merging Models from Different Tasks without Training",
            zipit,
            ZipItParams,
            needs_data=lambda _params: True,
            zips=True,
        ),
    )
}
