"""WUDI merging in closed form: the merged update that least disturbs each task's inputs.

Cheng et al. 2025, "Whoever Started the Interference Should End It: Guiding Data-Free Model
Merging via Task Vectors" (ICML). For a linear layer y = W x, the paper shows that the
inputs a fine-tuned layer sees lie (approximately) in the span of its task vector's rows, so
the interference a merged update tau_m causes on task i's inputs is measured, without data,
by ||(tau_m - tau_i) tau_i^T||_F. WUDI minimises (Eq. 9) the sum over tasks, each weighted
by 1 / ||tau_i||_F^2:

    L(tau_m) = sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2.

The paper minimises it with 300 Adam steps from the sum of the task vectors. L is a convex
quadratic, so its minimiser is the solution of the normal equations grad L = 0:

    tau_m A = B,   A = sum_i tau_i^T tau_i / ||tau_i||^2,
                   B = sum_i tau_i tau_i^T tau_i / ||tau_i||^2,

computed here directly: tau_m = B (A + eps * tr(A) / n * I)^-1, a ridge ``epsilon`` relative
to A's mean eigenvalue (tr(A) = T, the number of tasks; n = the input dimension). Since B's
rows lie in A's row space, the ridge only damps directions whose eigenvalue is below about
``epsilon`` times the mean (it makes the solve well posed where the task vectors do not span
the input space, and leaves the rest unchanged to within that factor). The Grams are float32
products on the compute device, the solve float64. Where the task vectors' row spaces are
mutually orthogonal the minimiser is their sum (task arithmetic).

The gradient-descent version stops well short of this minimiser (at the paper's learning
rate 1e-5 an entry moves by at most about 3e-3 in 300 steps), so outputs differ from the
paper's code and FusionBench's ``wudi`` by design. Tensors that are not matrices get the
mean task vector, as the paper's code; ``alpha`` scales the merged update (1, the paper's).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_cli.engine.method import TensorJob, TensorMethod
from merge_cli.fuse.tensorwise.spectral import merge_matrices
from merge_cli.fuse.tensorwise.task_arithmetic import WeightParams


class WudiParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(1.0, description="scale of the merged task vector")
    epsilon: float = Field(
        1e-6, gt=0, description="ridge, relative to the mean eigenvalue of the input Gram"
    )


def _tau_gram_product(delta: torch.Tensor) -> torch.Tensor:
    """tau tau^T tau, multiplied in the cheaper order for its shape."""
    if delta.shape[0] <= delta.shape[1]:
        return (delta @ delta.T) @ delta
    return delta @ (delta.T @ delta)


def wudi_merge(deltas: list[torch.Tensor], epsilon: float) -> torch.Tensor:
    """The minimiser of sum_i ||(tau_m - tau_i) tau_i^T||^2 / ||tau_i||^2 (with the ridge)."""
    n = deltas[0].shape[1]
    a = torch.zeros(n, n, dtype=torch.float64, device=deltas[0].device)
    b = torch.zeros(deltas[0].shape, dtype=torch.float64, device=deltas[0].device)
    used = 0
    for delta in deltas:
        norm2 = float(delta.double().square().sum())
        if norm2 == 0:
            continue  # a task that did not move this matrix adds no constraint
        used += 1
        a += (delta.T @ delta).double().div_(norm2)
        b += _tau_gram_product(delta).double().div_(norm2)
    if not used:
        return deltas[0].clone()
    a.diagonal().add_(epsilon * float(a.diagonal().sum()) / n)
    return torch.linalg.solve(a, b.T).T.to(deltas[0].dtype)


def _merge(
    job: TensorJob, params: WudiParams, models: list[WeightParams], _stats: Any
) -> torch.Tensor:
    def merge(deltas: list[torch.Tensor]) -> torch.Tensor:
        return wudi_merge(deltas, params.epsilon)

    return merge_matrices(job, [m.weight for m in models], params.alpha, merge)


METHOD = TensorMethod(
    name="wudi",
    family="weight_average",
    summary="WUDI in closed form: the update least interfering with each task's input span.",
    reference=(
        "Cheng et al. 2025, Whoever Started the Interference Should End It: Guiding "
        "Data-Free Model Merging via Task Vectors (ICML)"
    ),
    params=WudiParams,
    model_params=WeightParams,
    needs_base=True,
    merge=_merge,
    chunkable=False,
)
