"""Singular value calibration: a post-processing step for any task-vector merge (``<method>_svc``).

Li et al. 2026, "When Shared Knowledge Hurts: Spectral Over-Accumulation in Model Merging"
(ICML). Summing task updates that share singular directions counts the shared knowledge
several times: the merged update's top singular values are inflated. SVC measures, per
singular direction of the merged update Delta_m = U S V^T, how much the merge amplifies each
task there and scales that singular value back:

* the *subspace responses* (Eq. 4) of the merge and of task i along u_r:
  a_r^m = u_r^T Delta_m (= s_r v_r^T) and a_r^i = u_r^T Delta_i;
* the *projection coefficient* (Eq. 8) s_r^i = <a_r^m, a_r^i> / ||a_r^i||^2: above 1 the
  merge over-counts task i along u_r (a task with no response there counts as neutral,
  s_r^i = alpha);
* the *calibration* (Alg. 1) gamma_r = K / sum_i max(alpha, s_r^i) over the K tasks, and
  the calibrated update U diag(gamma_r s_r) V^T: only singular values change.

``svc_alpha`` is the paper's alpha (default 1; larger is stronger): a merge that already
reproduces every task's response (s = 1 throughout) is left unchanged at alpha <= 1. Each
method with a base model gets an ``<name>_svc`` entry: the method's merge, then SVC on every
2-D tensor, whole (the SVD needs all rows, so these entries never split a tensor into row
chunks), in float64 on the compute device; other tensors are the method's output unchanged,
as in the paper's code. The task vectors are taken before the method runs (a copy of the
inputs, as the method may overwrite them in place).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from pydantic import Field, create_model

from merge_cli.engine.method import TensorJob, TensorMethod
from merge_cli.fuse.tensorwise.breadcrumbs import METHODS as BREADCRUMBS
from merge_cli.fuse.tensorwise.consensus import METHODS as CONSENSUS
from merge_cli.fuse.tensorwise.dare import METHODS as DARE
from merge_cli.fuse.tensorwise.della import METHODS as DELLA
from merge_cli.fuse.tensorwise.iso import METHODS as ISO
from merge_cli.fuse.tensorwise.model_stock import METHOD as MODEL_STOCK
from merge_cli.fuse.tensorwise.ram import METHODS as RAM
from merge_cli.fuse.tensorwise.sce import METHOD as SCE
from merge_cli.fuse.tensorwise.task_arithmetic import METHOD as TASK_ARITHMETIC
from merge_cli.fuse.tensorwise.ties import METHOD as TIES
from merge_cli.fuse.tensorwise.tsv import METHOD as TSV
from merge_cli.fuse.tensorwise.wudi import METHOD as WUDI

REFERENCE = (
    "Li et al. 2026, When Shared Knowledge Hurts: Spectral Over-Accumulation in Model "
    "Merging (ICML)"
)


def calibrate(merged: torch.Tensor, deltas: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """U diag(gamma * S) V^T of the merged update ``merged`` (float64), with gamma from the
    task updates ``deltas`` (Alg. 1)."""
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    merged_response = s[:, None] * vh  # a_r^m = u_r^T Delta_m, [R, n]
    total = torch.zeros_like(s)
    for delta in deltas:
        response = u.T @ delta  # a_r^i, [R, n]
        norm2 = response.square().sum(1)
        coefficient = (merged_response * response).sum(1) / torch.where(norm2 > 0, norm2, 1.0)
        coefficient = torch.where(norm2 > 0, coefficient, alpha)
        total += coefficient.clamp(min=alpha)
    gamma = len(deltas) / total
    return (u * (gamma * s)) @ vh


def _with_svc(inner: TensorMethod) -> TensorMethod:
    def merge(job: TensorJob, params: Any, models: list[Any], stats: Any) -> torch.Tensor:
        if len(job.shape) != 2:
            return inner.merge(job, params, models, stats)
        assert job.base is not None
        base = job.base.double()
        deltas = [m.double() - base for m in job.models]
        merged = inner.merge(job, params, models, stats).double() - base
        return calibrate(merged, deltas, params.svc_alpha).add_(base).float()

    schema = create_model(
        f"{inner.params.__name__}Svc",
        __base__=inner.params,
        svc_alpha=(
            float,
            Field(1.0, ge=0, description="SVC's alpha: calibration strength (larger: stronger)"),
        ),
    )
    return replace(
        inner,
        name=f"{inner.name}_svc",
        summary=f"{inner.name}, then singular value calibration of each matrix.",
        reference=f"{inner.reference}; {REFERENCE}",
        params=schema,
        merge=merge,
        chunkable=False,
    )


#: ``<method>_svc`` for every task-vector method whose merge is one tensor from its inputs
#: and that fuses several models (one task vector, as nearswap's, has no others to be
#: calibrated against).
METHODS = [
    _with_svc(method)
    for method in (
        TASK_ARITHMETIC,
        TIES,
        *DARE,
        *BREADCRUMBS,
        *DELLA,
        MODEL_STOCK,
        SCE,
        *RAM,
        TSV,
        *ISO,
        *CONSENSUS,
        WUDI,
    )
]
