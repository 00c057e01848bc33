"""Permutation specs: which axes of which tensors share one permutation of units.

Hidden units (neurons, channels, attention heads) of a network can be reordered without
changing its function, as long as every tensor that indexes them is reordered the same way
(Ainsworth et al. 2023, "Git Re-Basin", Sec. 2). A :class:`PermutationSpec` lists those
symmetries as *groups*: a group is a set of ``size`` interchangeable units and the
(tensor, axis) pairs they index. Alignment finds one permutation (or soft map) per group.

Spec file format (YAML)::

    groups:
      - name: hidden0
        sites: [layers.0]          # optional: modules whose output carries the units
        axes:
          - {tensor: layers.0.weight, axis: 0}            # role defaults: axis 0 -> out
          - {tensor: layers.0.bias, axis: 0}
          - {tensor: layers.2.weight, axis: 1, block: 1}  # role defaults: other -> in

``block`` is the number of consecutive entries one unit spans along an axis (``head_dim``
for attention heads, ``H*W`` where a conv feature map is flattened into a linear layer).
``role`` says whether the axis *produces* the units (``out``: weight rows, biases, norm
vectors) or *consumes* them (``in``: the next layer's columns); permutations treat both the
same, soft maps (Sinkhorn, ZipIt) do not. ``statistic: true`` marks a running statistic of
the data (BatchNorm ``running_mean``/``running_var``; the default for tensors so named): it
is permuted with its units but is no weight, so weight matching leaves it out of its cost.
``within: PARENT`` makes a group permute units only inside the parent's blocks,
consistently with the parent's permutation (query heads inside their grouped-KV head).
``sites`` entries are module names (their output) or ``module:input`` (their first input),
the units lying on ``site_dim``; ``producer`` is the module whose weight rows and bias
REPAIR may rescale (unset where a norm layer follows).

Built-ins (:data:`BUILTIN_SPECS`) are derived from a checkpoint's tensor names and shapes;
``auto`` derives a spec from ``task.model`` with torch.fx (:mod:`merge_cli.align.fx_spec`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from merge_cli.errors import PlanError, RecipeError
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.task import logits_of

Role = Literal["out", "in"]


#: Buffer names of running statistics (BatchNorm); see :attr:`AxisRef.statistic`.
STATISTICS = ("running_mean", "running_var")


def is_statistic(tensor: str) -> bool:
    """Whether ``tensor`` is named as a running statistic (``*.running_mean``/``running_var``)."""
    return tensor.rpartition(".")[2] in STATISTICS


@dataclass(frozen=True)
class AxisRef:
    """One axis of one tensor indexed by a group's units.

    ``statistic``: the tensor is a running statistic of the data (BatchNorm's running mean
    and variance), not a weight. It is permuted with its units like any other axis, but
    weight matching leaves it out of the similarity it maximises: Git Re-Basin's objective
    (Ainsworth et al. 2023, Sec. 3.2) is the inner product of the *weights*, and its
    permutation specs list parameters only (of a norm layer: its scale and bias).
    """

    tensor: str
    axis: int
    block: int = 1
    role: Role = "out"
    statistic: bool = False


@dataclass(frozen=True)
class Group:
    """A set of ``size`` interchangeable units and every tensor axis they index."""

    name: str
    size: int
    axes: tuple[AxisRef, ...]
    within: str | None = None
    sites: tuple[str, ...] = ()
    site_dim: int = 1
    producer: str | None = None


@dataclass(frozen=True)
class PermutationSpec:
    """The symmetry groups of one architecture, in forward order."""

    groups: tuple[Group, ...]
    name: str = "spec"

    def group(self, name: str) -> Group:
        return next(g for g in self.groups if g.name == name)

    def find(self, name: str) -> Group | None:
        return next((g for g in self.groups if g.name == name), None)

    def children(self, name: str) -> list[Group]:
        return [g for g in self.groups if g.within == name]

    def tensors(self) -> list[str]:
        return list(dict.fromkeys(a.tensor for g in self.groups for a in g.axes))

    def axes_of(self) -> dict[str, list[tuple[AxisRef, Group]]]:
        """tensor name -> the (axis, group) pairs that touch it."""
        out: dict[str, list[tuple[AxisRef, Group]]] = {}
        for group in self.groups:
            for axis in group.axes:
                out.setdefault(axis.tensor, []).append((axis, group))
        return out

    def components(self) -> list[list[Group]]:
        """Groups connected through shared tensors; each can be solved on its own.

        A Llama spec (no residual-stream group) falls apart into one component per layer
        block, which is what lets alignment read a multi-GB model one layer at a time.
        """
        parent = {g.name: g.name for g in self.groups}

        def find(x: str) -> str:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for entries in self.axes_of().values():
            for _, group in entries[1:]:
                parent[find(group.name)] = find(entries[0][1].name)
        for group in self.groups:
            if group.within is not None:
                parent[find(group.name)] = find(group.within)
        components: dict[str, list[Group]] = {}
        for group in self.groups:
            components.setdefault(find(group.name), []).append(group)
        return list(components.values())


# ---------------------------------------------------------------------------------------
# Spec files


class _AxisModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tensor: str
    axis: int = Field(ge=0)
    block: int = Field(1, ge=1)
    role: Role | None = None
    statistic: bool | None = None


class _GroupModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    size: int | None = Field(None, ge=1)
    axes: list[_AxisModel] = Field(min_length=1)
    within: str | None = None
    sites: list[str] = Field(default_factory=list)
    site_dim: int = 1
    producer: str | None = None


class _SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    groups: list[_GroupModel] = Field(min_length=1)


def load_spec_file(path: str | Path, checkpoint: Checkpoint) -> PermutationSpec:
    """Read a YAML spec file and check it against ``checkpoint``'s tensor shapes."""
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
        model = _SpecModel.model_validate(raw)
    except OSError as error:
        raise RecipeError(source, [f"cannot read the spec ({error.strerror or error})"]) from None
    except yaml.YAMLError as error:
        raise RecipeError(source, [f"invalid YAML: {error}"]) from None
    except ValidationError as error:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()]
        raise RecipeError(source, problems) from None
    groups = []
    for item in model.groups:
        axes = tuple(
            AxisRef(
                a.tensor,
                a.axis,
                a.block,
                a.role or ("out" if a.axis == 0 else "in"),
                is_statistic(a.tensor) if a.statistic is None else a.statistic,
            )
            for a in item.axes
        )
        first = axes[0]
        shape = checkpoint.info(first.tensor).shape
        size = item.size or shape[first.axis] // first.block
        groups.append(
            Group(
                item.name, size, axes, item.within, tuple(item.sites), item.site_dim, item.producer
            )
        )
    spec = PermutationSpec(tuple(groups), name=Path(path).stem)
    validate_spec(spec, checkpoint, source)
    return spec


def validate_spec(spec: PermutationSpec, checkpoint: Checkpoint, source: str = "spec") -> None:
    """Every axis exists and has ``size * block`` entries; parents exist and divide."""
    problems = []
    names = set(checkpoint.tensor_names())
    seen: set[tuple[str, int]] = set()
    for group in spec.groups:
        for axis in group.axes:
            if axis.tensor not in names:
                problems.append(f"group {group.name}: no tensor {axis.tensor!r} in the checkpoint")
                continue
            shape = checkpoint.info(axis.tensor).shape
            if axis.axis >= len(shape) or shape[axis.axis] != group.size * axis.block:
                problems.append(
                    f"group {group.name}: {axis.tensor} axis {axis.axis} has shape {shape}, "
                    f"expected {group.size} units x block {axis.block}"
                )
            if (axis.tensor, axis.axis) in seen:
                problems.append(
                    f"group {group.name}: {axis.tensor} axis {axis.axis} is in two groups"
                )
            seen.add((axis.tensor, axis.axis))
        if group.within is not None:
            parent = spec.find(group.within)
            if parent is None or parent.within is not None or group.size % parent.size:
                problems.append(
                    f"group {group.name}: within {group.within!r} must name a top-level group "
                    "whose size divides this group's size"
                )
    if problems:
        raise PlanError(f"{source}: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------
# Built-in specs, from tensor names and shapes


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _modules(checkpoint: Checkpoint, module_order: list[str] | None) -> list[tuple[str, list[str]]]:
    """(module name, its floating tensor names), in forward order."""
    by_module: dict[str, list[str]] = {}
    for name in checkpoint.tensor_names():
        if checkpoint.info(name).dtype.is_floating_point:
            by_module.setdefault(name.rpartition(".")[0], []).append(name)
    if module_order is not None:
        rank = {m: i for i, m in enumerate(module_order)}
        order = sorted(by_module, key=lambda m: (rank.get(m, len(rank)), _natural_key(m)))
    else:
        order = sorted(by_module, key=_natural_key)
    return [(m, by_module[m]) for m in order]


def chain_spec(checkpoint: Checkpoint, module_order: list[str] | None = None) -> PermutationSpec:
    """Sequential networks (MLPs, plain CNNs): each weighted layer's outputs are one group.

    A module whose ``weight`` has >= 2 dims is a layer (Linear or Conv: rows produce units,
    columns consume the previous group, in blocks when a conv map is flattened); 1-D modules
    after it (BatchNorm, LayerNorm: weight, bias, running_mean, running_var) act on its group;
    running statistics are marked as such (:attr:`AxisRef.statistic`).
    The last layer's outputs are the network's outputs and stay fixed.
    """
    modules = _modules(checkpoint, module_order)
    layers = [
        m
        for m, names in modules
        if f"{m}.weight" in names and checkpoint.info(f"{m}.weight").shape[1:]
    ]
    if len(layers) < 2:
        raise PlanError(f"{checkpoint.source}: needs at least two weighted layers for a chain spec")
    groups: list[Group] = []
    axes: list[AxisRef] = []
    layer = site = producer = None
    for module, names in modules:
        weight = checkpoint.info(f"{module}.weight") if f"{module}.weight" in names else None
        if weight is not None and len(weight.shape) >= 2:
            if axes:
                size = checkpoint.info(axes[0].tensor).shape[0]
                block = weight.shape[1] // size
                axes.append(AxisRef(f"{module}.weight", 1, block, "in"))
                groups.append(Group(layer, size, tuple(axes), sites=(site,), producer=producer))
                axes = []
            if module == layers[-1]:
                break
            axes = [AxisRef(n, 0, statistic=is_statistic(n)) for n in names]
            layer = site = producer = module
        elif axes:  # a norm layer on the current group
            axes += [AxisRef(n, 0, statistic=is_statistic(n)) for n in names]
            site, producer = module, None
    return PermutationSpec(tuple(groups), name="chain")


def resnet_spec(checkpoint: Checkpoint) -> PermutationSpec:
    """torchvision-style ResNets (``conv1/bn1``, ``layerS.B.convK/bnK/downsample``, ``fc``).

    The residual stream of a stage is one shared group: the stem (or the stage's downsample
    projection) and every block's last conv/bn write it, every block's first conv reads it.
    Inside a block, each conv's output channels are a group of their own.
    """
    names = set(checkpoint.tensor_names())

    def module_axes(module: str) -> list[AxisRef]:
        return [
            AxisRef(f"{module}.{p}", 0, statistic=p in STATISTICS)
            for p in ("weight", "bias", *STATISTICS)
            if f"{module}.{p}" in names
        ]

    if "conv1.weight" not in names or "fc.weight" not in names:
        raise PlanError(f"{checkpoint.source}: not a torchvision-style ResNet (conv1, fc)")
    blocks = sorted(
        {m.group(1) for n in names if (m := re.match(r"(layer\d+\.\d+)\.", n))}, key=_natural_key
    )
    groups: list[Group] = []
    stream = module_axes("conv1") + module_axes("bn1")
    stream_sites: list[str] = []
    for block in blocks:
        convs = sorted(
            {m.group(1) for n in names if (m := re.match(rf"{block}\.(conv\d+)\.weight$", n))},
            key=_natural_key,
        )
        stream.append(AxisRef(f"{block}.{convs[0]}.weight", 1, 1, "in"))
        if f"{block}.downsample.0.weight" in names:
            stream.append(AxisRef(f"{block}.downsample.0.weight", 1, 1, "in"))
            groups.append(_stream_group(len(groups), stream, stream_sites, checkpoint))
            stream = module_axes(f"{block}.downsample.0") + module_axes(f"{block}.downsample.1")
            stream_sites = []
        for first, second in zip(convs, convs[1:], strict=False):
            bn = first.replace("conv", "bn")
            axes = module_axes(f"{block}.{first}") + module_axes(f"{block}.{bn}")
            axes.append(AxisRef(f"{block}.{second}.weight", 1, 1, "in"))
            size = checkpoint.info(axes[0].tensor).shape[0]
            groups.append(Group(f"{block}.{first}", size, tuple(axes), None, (f"{block}.{bn}",)))
        last = convs[-1]
        stream += module_axes(f"{block}.{last}") + module_axes(
            f"{block}.{last.replace('conv', 'bn')}"
        )
        stream_sites.append(block)
    stream.append(AxisRef("fc.weight", 1, 1, "in"))
    groups.append(_stream_group(len(groups), stream, stream_sites, checkpoint))
    return PermutationSpec(tuple(groups), name="resnet")


def _stream_group(index: int, axes: list[AxisRef], sites: list[str], ckpt: Checkpoint) -> Group:
    size = ckpt.info(axes[0].tensor).shape[0]
    return Group(f"stream{index}", size, tuple(axes), None, tuple(sites))


def llama_spec(checkpoint: Checkpoint, config: dict | None = None) -> PermutationSpec:
    """Llama-style decoders: per layer, MLP intermediate neurons and attention heads.

    MLP: ``gate_proj``/``up_proj`` rows and ``down_proj`` columns. Attention: the KV heads
    are one group (``k_proj``/``v_proj`` rows in blocks of ``head_dim``); the query heads are
    a child group permuted only within their KV head's block of query heads (``q_proj`` rows,
    ``o_proj`` columns), so grouped-query attention keeps each query with its KV head. Whole
    heads move, never dimensions within a head: RoPE rotates dimension pairs inside a head.
    The residual stream is left alone, so each layer is solved (and read) on its own.
    """
    if config is None:
        if checkpoint.directory is None or not (checkpoint.directory / "config.json").exists():
            raise PlanError(
                f"{checkpoint.source}: the llama spec needs config.json for head counts"
            )
        config = json.loads((checkpoint.directory / "config.json").read_text())
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    names = checkpoint.tensor_names()
    layers = sorted(
        {
            m.group(1)
            for n in names
            if (m := re.match(r"(.*layers\.\d+\.)mlp\.gate_proj\.weight$", n))
        },
        key=_natural_key,
    )
    if not layers:
        raise PlanError(f"{checkpoint.source}: no '*layers.N.mlp.gate_proj.weight' tensors (llama)")
    have = set(names)
    groups = []
    for prefix in layers:
        mlp, attn = f"{prefix}mlp.", f"{prefix}self_attn."
        rows = [
            AxisRef(f"{mlp}{p}_proj.{k}", 0) for p in ("gate", "up") for k in ("weight", "bias")
        ]
        axes = [a for a in rows if a.tensor in have] + [
            AxisRef(f"{mlp}down_proj.weight", 1, 1, "in")
        ]
        size = checkpoint.info(f"{mlp}gate_proj.weight").shape[0]
        groups.append(
            Group(f"{prefix}mlp", size, tuple(axes), None, (f"{mlp}down_proj:input",), -1)
        )
        kv = [
            AxisRef(f"{attn}{p}_proj.{k}", 0, head_dim)
            for p in ("k", "v")
            for k in ("weight", "bias")
        ]
        groups.append(Group(f"{prefix}attn.kv", kv_heads, tuple(a for a in kv if a.tensor in have)))
        q = [AxisRef(f"{attn}q_proj.{k}", 0, head_dim) for k in ("weight", "bias")]
        q = [a for a in q if a.tensor in have] + [
            AxisRef(f"{attn}o_proj.weight", 1, head_dim, "in")
        ]
        groups.append(Group(f"{prefix}attn.heads", heads, tuple(q), f"{prefix}attn.kv"))
    return PermutationSpec(tuple(groups), name="llama")


#: Built-in spec builders by name: (checkpoint, module order or None) -> spec.
BUILTIN_SPECS: dict[str, Callable[[Checkpoint, list[str] | None], PermutationSpec]] = {
    "mlp": chain_spec,
    "cnn": chain_spec,
    "resnet": lambda checkpoint, _order: resnet_spec(checkpoint),
    "llama": lambda checkpoint, _order: llama_spec(checkpoint),
}


# ---------------------------------------------------------------------------------------
# Random permutations and in-memory application (for checks and tests)


def random_permutations(spec: PermutationSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """One uniformly random permutation per group (children respect their parent)."""
    generator = torch.Generator().manual_seed(seed)
    perms: dict[str, torch.Tensor] = {}
    for group in spec.groups:
        if group.within is None:
            perms[group.name] = torch.randperm(group.size, generator=generator)
    for group in spec.groups:
        if group.within is not None:
            parent = perms[group.within]
            per = group.size // len(parent)
            inner = [torch.randperm(per, generator=generator) for _ in range(len(parent))]
            perms[group.name] = torch.cat(
                [int(parent[j]) * per + inner[j] for j in range(len(parent))]
            )
    return perms


def expand(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Unit permutation -> entry permutation of an axis where each unit spans ``block``."""
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block)).reshape(-1)


def permute_state_dict(
    state: dict[str, torch.Tensor], spec: PermutationSpec, perms: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state`` with every group's axes reordered: new unit i is old unit ``perm[i]``."""
    out = dict(state)
    for group in spec.groups:
        for axis in group.axes:
            out[axis.tensor] = out[axis.tensor].index_select(
                axis.axis, expand(perms[group.name], axis.block)
            )
    return out


@torch.no_grad()
def check_spec(
    spec: PermutationSpec,
    model: torch.nn.Module,
    inputs: object,
    seed: int = 0,
    atol: float = 1e-4,
) -> float:
    """Apply random permutations from ``spec`` and compare outputs; raise if they differ.

    Returns the largest absolute output difference. A wrong spec (a missing axis, a wrong
    block) changes the function and fails here.
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    before = logits_of(model(inputs))
    model.load_state_dict(permute_state_dict(state, spec, random_permutations(spec, seed)))
    after = logits_of(model(inputs))
    model.load_state_dict(state)
    difference = float((before - after).abs().max())
    if not difference <= atol * max(1.0, float(before.abs().max())):
        raise PlanError(
            f"spec {spec.name!r} does not describe a symmetry of the model: permuting changed "
            f"the outputs by up to {difference:.3g}"
        )
    return difference
