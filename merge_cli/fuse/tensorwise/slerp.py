"""Spherical linear interpolation of two models: ``slerp`` and ``nuslerp``.

Shoemake 1985, "Animating rotation with quaternion curves" (SIGGRAPH), applied to weights as
in mergekit (Goddard et al. 2024, "Arcee's MergeKit"): each tensor of the two models is read
as one vector; the result follows the great circle between their directions,

    slerp(t; v0, v1) = sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1,

with theta the angle between v0 and v1, and falls back to linear interpolation when they are
(nearly) colinear. Only the two norms and the dot product come from the whole tensor; they
are exact under chunking (:func:`merge_cli.engine.chunks.gram_matrix`), and the result is a
per-tensor linear combination of the inputs.

* ``slerp`` (mergekit's semantics): ``t`` is the position from the base model (t = 0) to the
  other model (t = 1); without ``fuse.base``, from the first to the second fused model.
  Colinear when |cos theta| > 0.9995.
* ``nuslerp`` (mergekit's "NuSLERP"): ``t`` comes from the per-model weights,
  t = w1 / (w0 + w1), for exactly two fused models; with ``fuse.base`` it interpolates their
  task vectors and adds the base back. ``nuslerp_flatten: false`` interpolates each row
  vector (last dim) on its own, and with ``nuslerp_row_wise: true`` each column (dim 0).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_cli.engine.chunks import ChunkPasses, gram_matrix, gram_per_row
from merge_cli.engine.method import TensorJob, TensorMethod
from merge_cli.fuse.tensorwise.task_arithmetic import WeightParams
from merge_cli.recipe import FuseSpec

DOT_THRESHOLD = 0.9995


def slerp_coefficients(
    t: torch.Tensor | float,
    gram: torch.Tensor,
    *,
    colinear_cos: float | None = DOT_THRESHOLD,
    colinear_sin: float = 0.0,
    norm_eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (c0, c1) with slerp(t; v0, v1) = c0 v0 + c1 v1, from Gram matrices.

    ``gram[..., 2, 2]`` holds <v_i, v_j> (float64). A pair is treated as colinear, and
    interpolated linearly, when |cos| > ``colinear_cos`` (slerp) or sin < ``colinear_sin``
    (nuslerp). A vector whose norm is at most ``norm_eps`` is not normalized (as mergekit).
    """
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    norms = torch.where(norms > norm_eps, norms, 1.0)
    cos = (gram[..., 0, 1] / (norms[..., 0] * norms[..., 1])).clamp(-1, 1)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    t = torch.as_tensor(t, dtype=torch.float64)
    colinear = sin.abs() <= colinear_sin
    if colinear_cos is not None:
        colinear |= cos.abs() > colinear_cos
    safe_sin = torch.where(colinear, 1.0, sin)
    c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / safe_sin)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / safe_sin)
    return c0, c1


def _pair(job: TensorJob) -> tuple[torch.Tensor, torch.Tensor]:
    if job.base is not None:
        return job.base, job.models[0]
    return job.models[0], job.models[1]


def _two_models(spec: FuseSpec, fused: list[str]) -> list[str]:
    wanted = 1 if spec.base is not None else 2
    if len(fused) != wanted:
        where = "besides fuse.base" if spec.base is not None else "without fuse.base"
        return [
            f"fuse.models: method {spec.method!r} interpolates two models: {wanted} "
            f"model(s) {where}, got {len(fused)}"
        ]
    return []


class SlerpParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    t: float = Field(
        ge=0, le=1, description="position from the base (or first) model (0) to the other (1)"
    )


def _slerp_statistics(passes: ChunkPasses, _params: Any, _models: Any) -> Any:
    return gram_matrix(passes, lambda job: list(_pair(job)))


def _slerp(job: TensorJob, params: SlerpParams, _models: Any, gram: Any) -> torch.Tensor:
    v0, v1 = _pair(job)
    c0, c1 = slerp_coefficients(params.t, gram)
    return v0 * float(c0) + v1 * float(c1)


SLERP = TensorMethod(
    name="slerp",
    url="https://doi.org/10.1145/325165.325242",
    family="weight_average",
    summary="Spherical interpolation between two models (t=0: base or first, t=1: the other).",
    reference="Shoemake 1985 (SLERP); mergekit's slerp (Goddard et al. 2024)",
    params=SlerpParams,
    min_models=1,
    max_models=2,
    merge=_slerp,
    statistics=_slerp_statistics,
    check=_two_models,
)


class NuSlerpParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nuslerp_flatten: bool = Field(
        True, description="interpolate the whole tensor as one vector (else per row vector)"
    )
    nuslerp_row_wise: bool = Field(
        False, description="without flatten: interpolate columns (dim 0) instead of rows"
    )


def _nuslerp_vectors(job: TensorJob) -> list[torch.Tensor]:
    if job.base is None:
        return list(job.models)
    return [model - job.base for model in job.models]


def _nuslerp_t(models: list[WeightParams]) -> float:
    total = models[0].weight + models[1].weight
    return 0.5 if abs(total) < 1e-6 else models[1].weight / total


def _nuslerp_mode(params: NuSlerpParams, shape: tuple[int, ...]) -> str:
    if params.nuslerp_flatten or len(shape) < 2:
        return "whole"
    return "columns" if params.nuslerp_row_wise else "rows"


def _nuslerp_statistics(passes: ChunkPasses, params: NuSlerpParams, _models: Any) -> Any:
    mode = _nuslerp_mode(params, passes.shape)
    if mode == "whole":
        return gram_matrix(passes, _nuslerp_vectors)
    if mode == "columns":
        # Per-column Gram matrices [*shape[1:], 2, 2], summed over the rows of every chunk.
        total = None
        for job in passes():
            v = torch.stack([x.double() for x in _nuslerp_vectors(job)], dim=-1)
            part = torch.einsum("r...i,r...j->...ij", v, v)
            total = part if total is None else total + part
        return total
    return None


def _nuslerp(
    job: TensorJob, params: NuSlerpParams, models: list[WeightParams], stats: Any
) -> torch.Tensor:
    v0, v1 = _nuslerp_vectors(job)
    t = _nuslerp_t(models)
    options = {"colinear_cos": None, "colinear_sin": 1e-8, "norm_eps": 1e-7}
    mode = _nuslerp_mode(params, job.shape)
    if mode == "whole":
        c0, c1 = (float(c) for c in slerp_coefficients(t, stats, **options))
    else:
        if mode == "rows":
            gram = gram_per_row([v0.reshape(-1, v0.shape[-1]), v1.reshape(-1, v1.shape[-1])])
            shape = (*v0.shape[:-1], 1)
        else:
            gram, shape = stats, (1, *v0.shape[1:])
        c0, c1 = (c.to(v0.dtype).reshape(shape) for c in slerp_coefficients(t, gram, **options))
    merged = v0 * c0 + v1 * c1
    return merged if job.base is None else merged.add_(job.base)


NUSLERP = TensorMethod(
    name="nuslerp",
    url="https://arxiv.org/abs/2403.13257",
    family="weight_average",
    summary="SLERP of two models (or their task vectors) with t from per-model weights.",
    reference="mergekit's nuslerp (Goddard et al. 2024); Shoemake 1985 (SLERP)",
    params=NuSlerpParams,
    model_params=WeightParams,
    min_models=2,
    max_models=2,
    merge=_nuslerp,
    statistics=_nuslerp_statistics,
)

METHODS = [SLERP, NUSLERP]
