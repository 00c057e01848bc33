"""Merging LoRA adapters of one base into one adapter, in adapter space (``fuse.output:
adapter``): PEFT's ``LoraModel.add_weighted_adapter`` combinations, computed from the
adapter files without building a model, and written as a PEFT adapter directory.

Per adapted module, with ``w_i`` the model's ``weight`` and ``s_i`` its adapter's scale
(``lora_alpha / r``, or ``/ √r`` with rsLoRA; Hu et al. 2021, Kalajdzievski 2023):

- ``cat``: ``A = [w_i·s_i·A_i]`` stacked, ``B = [B_i]`` side by side; rank Σ r_i (zero-padded
  to PEFT's global rank); ``B·A = Σ w_i·s_i·B_i·A_i`` exactly.
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the combination
  applied to the ``A`` factors and to the ``B`` factors separately, weighted by
  ``±√|w_i·s_i|`` (the sign on ``A``); all adapters must share one rank. A rough, cheap
  approximation, as PEFT warns.
- ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the
  combination applied to the full deltas ``s_i·B_i·A_i``, then truncated to ``svd_rank``
  (default: the largest adapter rank) by SVD: ``B = U·S``, ``A = Vᵀ`` (optionally clamped at
  the ``svd_clamp`` quantile).

The pruning and sign election are PEFT's ``merge_utils``: TIES (Yadav et al. 2023, "TIES-
Merging: Resolving Interference When Merging Models"), DARE (Yu et al. 2024, "Language Models
are Super Mario"), magnitude pruning; with ``density`` the kept fraction and
``majority_sign_method`` ``total`` or ``frequency``. The output's ``adapter_config.json`` is
PEFT's: the first adapter's config with ``r = lora_alpha =`` the new rank, the union of the
target modules and no rank/alpha patterns, so its scale is 1. (PEFT also keeps the first
adapter's ``use_rslora``, which makes its merged adapter's scale ``√r`` instead: the factors
already carry each adapter's scale, so merge-cli writes ``use_rslora: false``; the tensors are
PEFT's either way.) DARE draws its masks from a generator seeded by ``fuse.seed`` and the
module's name (PEFT uses torch's global generator), so a recipe gives the same adapter on
every run.

Adapters with DoRA magnitudes, ``lora_bias`` or ``modules_to_save`` are refused: PEFT's
combinations do not define them. Merge such adapters into a model instead (``fuse.output:
model``, the default), where they are applied exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from merge_cli.engine.executor import tensor_seed
from merge_cli.errors import PlanError
from merge_cli.io.adapters import (
    ADAPTER_WEIGHTS,
    AdapterCheckpoint,
    LoraAdapter,
    LoraModule,
    adapter_tensor_names,
    write_adapter,
)
from merge_cli.io.checkpoint import Checkpoint, TensorInfo
from merge_cli.io.direct import BUFFER_BYTES
from merge_cli.options import RunOptions
from merge_cli.recipe import Recipe


class CombinationParams(BaseModel):
    """``fuse.params`` of an adapter-space merge (PEFT's ``add_weighted_adapter`` arguments)."""

    model_config = ConfigDict(extra="forbid")

    density: float | None = Field(None, gt=0, le=1, description="fraction of entries kept")
    majority_sign_method: Literal["total", "frequency"] = "total"
    svd_rank: int | None = Field(None, ge=1, description="rank of the svd combinations' output")
    svd_clamp: float | None = Field(None, gt=0, le=1, description="quantile clamp of U·S and Vᵀ")
    svd_full_matrices: bool = True


class CombinationModelParams(BaseModel):
    """``fuse.models.NAME`` of an adapter-space merge."""

    model_config = ConfigDict(extra="forbid")

    weight: float = 1.0


#: ``(task tensors, weights, params, generator) -> combined``, PEFT's merge_utils functions.
Combine = Callable[[list[torch.Tensor], torch.Tensor, CombinationParams, torch.Generator], Any]


@dataclass(frozen=True)
class Combination:
    """One ``combination_type``: how factors (or deltas) combine and in which space."""

    name: str
    space: Literal["factors", "delta", "cat"]
    combine: Combine | None
    needs_density: bool = False


# -- PEFT's merge_utils, on plain tensors ---------------------------------------------------


def _weighted(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return tensors * weights.view(weights.shape + (1,) * (tensors.dim() - weights.dim()))


def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[top[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def _random_prune(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def _disjoint(tensors: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    """TIES's sign election and disjoint mean (PEFT's ``calculate_majority_sign_mask`` and
    ``disjoint_merge``)."""
    sign = tensors.sign()
    magnitude = tensors.sum(dim=0) if method == "total" else sign.sum(dim=0)
    mask = sign == torch.where(magnitude >= 0, 1, -1)
    mixed = (_weighted(tensors, weights) * mask).sum(dim=0)
    return mixed / torch.clamp(mask.sum(dim=0), min=1.0)


def task_arithmetic(tensors, weights, params, generator):
    return _weighted(torch.stack(tensors), weights).sum(dim=0)


def magnitude_prune(tensors, weights, params, generator):
    pruned = [_magnitude_prune(t, params.density) for t in tensors]
    return _weighted(torch.stack(pruned), weights).sum(dim=0)


def ties(tensors, weights, params, generator):
    pruned = torch.stack([_magnitude_prune(t, params.density) for t in tensors])
    return _disjoint(pruned, weights, params.majority_sign_method)


def dare_linear(tensors, weights, params, generator):
    pruned = [_random_prune(t, params.density, generator) for t in tensors]
    return _weighted(torch.stack(pruned), weights).sum(dim=0)


def dare_ties(tensors, weights, params, generator):
    pruned = torch.stack([_random_prune(t, params.density, generator) for t in tensors])
    return _disjoint(pruned, weights, params.majority_sign_method)


_BY_NAME: dict[str, tuple[Combine, bool]] = {
    "linear": (task_arithmetic, False),
    "ties": (ties, True),
    "dare_linear": (dare_linear, True),
    "dare_ties": (dare_ties, True),
    "magnitude_prune": (magnitude_prune, True),
}
#: Every combination, by PEFT's ``combination_type`` name.
COMBINATIONS: dict[str, Combination] = {
    "cat": Combination("cat", "cat", None),
    "svd": Combination("svd", "delta", task_arithmetic),
    **{name: Combination(name, "factors", f, density) for name, (f, density) in _BY_NAME.items()},
    **{
        f"{name}_svd": Combination(f"{name}_svd", "delta", f, density)
        for name, (f, density) in _BY_NAME.items()
        if name != "linear"
    },
}


# -- recipe checks --------------------------------------------------------------------------


def check_adapter_fuse(recipe: Recipe) -> list[str]:
    """Problems with a ``fuse`` section whose ``output`` is ``adapter`` (before any file is
    read: the adapters' own checks come when they are opened)."""
    spec = recipe.fuse
    assert spec is not None
    problems = []
    combination = COMBINATIONS.get(spec.method)
    if combination is None:
        names = ", ".join(COMBINATIONS)
        problems.append(
            f"fuse.method: {spec.method!r} is not an adapter combination (fuse.output: "
            f"adapter takes PEFT's: {names})"
        )
    if spec.base is not None:
        problems.append(
            "fuse.base: an adapter-space merge has no base model; every model is an adapter "
            "(models.NAME.lora) of the same base (models.NAME.path)"
        )
    for key, value in (("rules", spec.rules), ("tokenizer_source", spec.tokenizer_source)):
        if value:
            problems.append(f"fuse.{key}: not available with fuse.output: adapter")
    if recipe.align is not None:
        problems.append("align: not available with fuse.output: adapter")
    if any("merged" in (e.models or []) + (e.between or []) for e in recipe.evaluate):
        problems.append("evaluate: the merged output is an adapter; evaluate its base with it")
    fused = spec.model_names(list(recipe.models))
    if not fused:
        problems.append("fuse.models: an adapter-space merge needs at least one adapter")
    paths = {recipe.models[n].path for n in fused if n in recipe.models}
    for name in fused:
        if name in recipe.models and recipe.models[name].lora is None:
            problems.append(
                f"models.{name}: fuse.output: adapter merges adapters; give it a lora: adapter"
            )
    if len(paths) > 1:
        problems.append(
            f"models: the adapters of an adapter-space merge must share one base path, got "
            f"{', '.join(sorted(paths))}"
        )
    problems += _param_problems(spec.params, CombinationParams, "fuse.params")
    for name in spec.models or {}:
        problems += _param_problems(
            spec.model_values(name), CombinationModelParams, f"fuse.models.{name}"
        )
    if combination is not None and combination.needs_density and "density" not in spec.params:
        problems.append(f"fuse.params.density: required by the {spec.method} combination")
    return problems


def _param_problems(values: dict[str, Any], schema: type[BaseModel], where: str) -> list[str]:
    try:
        schema.model_validate(values)
    except ValidationError as error:
        return [
            f"{where}.{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors()
        ]
    return []


# -- planning and running --------------------------------------------------------------------


@dataclass
class _Input:
    name: str
    adapter: LoraAdapter
    weight: float


@dataclass
class AdapterPlan:
    """An adapter-space merge fixed from headers: its inputs, rank, modules and output."""

    combination: Combination
    params: CombinationParams
    inputs: list[_Input]
    rank: int
    modules: list[str]
    tensors: list[TensorInfo]
    config: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """What ``merge-cli plan`` shows, in the keys of a streaming merge's summary."""
        written = sum(info.nbytes for info in self.tensors)
        read = sum(
            i.adapter.weights.info(n).nbytes
            for i in self.inputs
            for n in i.adapter.weights.tensor_names()
        )
        # One module at a time: its factors, and for the svd combinations the full deltas
        # (one per adapter, the combination, and the SVD's U, S, Vᵀ).
        largest = 0
        for a, b in zip(self.tensors[::2], self.tensors[1::2], strict=True):
            rows, cols = b.shape[0], a.shape[1]
            full = rows * cols * 4 * (len(self.inputs) + 2) + (rows * rows + cols * cols) * 4
            largest = max(largest, full if self.combination.space == "delta" else 0)
            largest = max(largest, 2 * (a.nbytes + b.nbytes) * (len(self.inputs) + 1))
        return {
            "output": "adapter",
            "method": self.combination.name,
            "models": [i.name for i in self.inputs],
            "base": None,
            "rank": self.rank,
            "tensors": len(self.tensors),
            "merged_tensors": len(self.tensors),
            "copied_tensors": 0,
            "bytes_read": read,
            "bytes_written": written,
            "expected_peak_memory": largest + BUFFER_BYTES,
            "shards": [{"file": ADAPTER_WEIGHTS, "tensors": len(self.tensors), "bytes": written}],
        }


def plan_adapter_merge(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> AdapterPlan:
    """The merge of the recipe's adapters (already opened and checked against their base)."""
    spec = recipe.fuse
    assert spec is not None
    combination = COMBINATIONS[spec.method]
    params = CombinationParams.model_validate(spec.params)
    inputs = []
    for name in spec.model_names(list(recipe.models)):
        checkpoint = checkpoints[name]
        assert isinstance(checkpoint, AdapterCheckpoint)
        _check_combinable(name, checkpoint.adapter)
        weight = CombinationModelParams.model_validate(spec.model_values(name)).weight
        inputs.append(_Input(name, checkpoint.adapter, weight))
    if len(inputs) == 1:  # as PEFT: one adapter can only be scaled
        combination = COMBINATIONS["linear"]
    ranks = [_config_rank(i.adapter.config) for i in inputs]
    if combination.space == "factors" and len(set(ranks)) > 1:
        raise PlanError(
            f"fuse.method {combination.name}: combines the factors A and B entry by entry, so "
            f"every adapter needs the same rank; got {', '.join(map(str, ranks))} (use cat or svd)"
        )
    if combination.space == "cat":
        rank = sum(ranks)
    elif combination.space == "delta":
        rank = params.svd_rank or max(ranks)
    else:
        rank = ranks[0]
    modules = _union_modules(inputs)
    tensors = []
    for target in modules:
        lora = _first_module(inputs, target)
        a_shape = _inputs_of(inputs, target)[0][1].weights.info(lora.a).shape
        b_shape = _inputs_of(inputs, target)[0][1].weights.info(lora.b).shape
        a_name, b_name = adapter_tensor_names(lora.module, lora.a.endswith("lora_embedding_A"))
        tensors.append(TensorInfo(a_name, (rank, a_shape[1]), torch.float32))
        tensors.append(TensorInfo(b_name, (b_shape[0], rank), torch.float32))
    config = _output_config(inputs, rank)
    return AdapterPlan(combination, params, inputs, rank, modules, tensors, config)


def _check_combinable(name: str, adapter: LoraAdapter) -> None:
    what = None
    if any(m.magnitude is not None for m in adapter.modules.values()):
        what = "DoRA magnitudes"
    elif adapter.bias_of:
        what = "lora_bias"
    elif adapter.config.get("modules_to_save") or any(
        not n.endswith(".base_layer.weight") for n in adapter.replaced.values()
    ):
        what = "modules_to_save"
    if what is not None:
        raise PlanError(
            f"models.{name}: {adapter.source} has {what}, which PEFT's adapter combinations "
            "do not define; merge it into a model instead (fuse.output: model)"
        )


def _config_rank(config: dict[str, Any]) -> int:
    """PEFT's rank of an adapter for add_weighted_adapter: r, or the largest rank_pattern."""
    pattern = config.get("rank_pattern") or {}
    return max(int(config["r"]), *map(int, pattern.values())) if pattern else int(config["r"])


def _union_modules(inputs: list[_Input]) -> list[str]:
    seen: dict[str, None] = {}
    for item in inputs:
        for target in item.adapter.modules:
            seen.setdefault(target)
    return list(seen)


def _inputs_of(inputs: list[_Input], target: str) -> list[tuple[_Input, LoraAdapter, LoraModule]]:
    return [
        (i, i.adapter, i.adapter.modules[target]) for i in inputs if target in i.adapter.modules
    ]


def _first_module(inputs: list[_Input], target: str) -> LoraModule:
    return _inputs_of(inputs, target)[0][2]


def _output_config(inputs: list[_Input], rank: int) -> dict[str, Any]:
    """PEFT's: the first adapter's config with the new rank and the union of targets."""
    config = dict(inputs[0].adapter.config)
    targets = [i.adapter.config.get("target_modules") for i in inputs]
    if all(isinstance(t, str) for t in targets):
        union: Any = "|".join(f"({t})" for t in targets)
    else:
        union = sorted({m for t in targets for m in (t if isinstance(t, list) else [t])})
    config.update(r=rank, lora_alpha=rank, target_modules=union, rank_pattern={}, alpha_pattern={})
    # PEFT keeps the first adapter's use_rslora, which scales the merged adapter by √r
    # instead of 1 (its factors already hold each adapter's scale): written off here.
    config["use_rslora"] = False
    return config


def combine_module(plan: AdapterPlan, target: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged ``(A, B)`` of one module, as PEFT's ``add_weighted_adapter`` computes them."""
    found = _inputs_of(plan.inputs, target)
    generator = torch.Generator().manual_seed(tensor_seed(seed, target))
    factors = [(i.weight, m.scale, a.weights.read(m.a), a.weights.read(m.b)) for i, a, m in found]
    space = plan.combination.space
    if space == "cat":
        stacked_a = torch.cat([fa * w * s for w, s, fa, _ in factors], dim=0)
        stacked_b = torch.cat([fb for _, _, _, fb in factors], dim=1)
        a = torch.zeros(plan.rank, stacked_a.shape[1], dtype=stacked_a.dtype)
        b = torch.zeros(stacked_b.shape[0], plan.rank, dtype=stacked_b.dtype)
        a[: stacked_a.shape[0]] = stacked_a
        b[:, : stacked_b.shape[1]] = stacked_b
        return a, b
    combine = plan.combination.combine
    assert combine is not None
    if space == "factors":
        scaled = [w * s for w, s, _, _ in factors]
        weights_a = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled])
        weights_b = torch.tensor([math.sqrt(abs(x)) for x in scaled])
        dtype = factors[0][2].dtype
        a = combine([fa for _, _, fa, _ in factors], weights_a, plan.params, generator)
        b = combine([fb for _, _, _, fb in factors], weights_b, plan.params, generator)
        return a.to(dtype), b.to(dtype)
    deltas = [(fb.float() @ fa.float()) * s for _, s, fa, fb in factors]
    weights = torch.tensor([w for w, _, _, _ in factors])
    delta = combine(deltas, weights, plan.params, generator)
    return _truncate(delta, plan.rank, plan.params)


def _truncate(delta: torch.Tensor, rank: int, params: CombinationParams):
    """PEFT's SVD step: ``B = U·S``, ``A = Vᵀ`` at ``rank``, optionally quantile-clamped."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=params.svd_full_matrices)
    u = u[:, :rank] @ torch.diag(s[:rank])
    vh = vh[:rank, :]
    if params.svd_clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), params.svd_clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh, u


def fuse_adapters(
    recipe: Recipe, checkpoints: dict[str, Checkpoint], options: RunOptions
) -> tuple[Path, dict[str, Any]]:
    """Merge the recipe's adapters into one PEFT adapter at ``save.path``."""
    assert recipe.save is not None and recipe.fuse is not None
    plan = plan_adapter_merge(recipe, checkpoints)
    seed = recipe.fuse.seed
    current: dict[str, torch.Tensor] = {}  # the module being written: B waits beside A

    def produce(info: TensorInfo):
        if info.name not in current:
            current.clear()
            index = plan.tensors.index(info) // 2
            a, b = combine_module(plan, plan.modules[index], seed)
            options.progress.advance(1)
            current[plan.tensors[2 * index].name] = a
            current[plan.tensors[2 * index + 1].name] = b
        return [current[info.name]]

    options.progress.start(
        f"merging adapters ({plan.combination.name})", len(plan.modules), unit="modules"
    )
    card = _card(recipe, plan)
    output = write_adapter(
        Path(recipe.save.path), plan.config, plan.tensors, produce, {"README.md": card},
        options.overwrite,
    )  # fmt: skip
    options.progress.finish()
    return output, plan.summary()


def _card(recipe: Recipe, plan: AdapterPlan) -> str:
    sources = "\n".join(
        f"- `{i.name}` (weight {i.weight}): {i.adapter.source}" for i in plan.inputs
    )
    base = plan.config.get("base_model_name_or_path")
    return (
        f"---\nlibrary_name: peft\nbase_model: {base}\ntags:\n- merge-cli\n- lora\n---\n\n"
        f"# Merged LoRA adapter\n\nThe `{plan.combination.name}` combination (PEFT's "
        f"add_weighted_adapter) of:\n\n{sources}\n"
    )
