"""``spec: auto``: derive a permutation spec from ``task.model`` with torch.fx.

The model is traced (:func:`torch.fx.symbolic_trace`) and its shapes propagated on an
example input. Walking the graph forward, every Linear/Conv output starts a new group of
units; ops that act on each unit alone (activations, dropout, pooling, BatchNorm/LayerNorm)
pass the group on, adding their per-unit tensors (their buffers as running statistics,
:attr:`~merge_cli.align.spec.AxisRef.statistic`); a flatten passes it on in blocks of
``H*W``; an addition merges the groups of its operands (a residual stream shares one
permutation). A group that reaches the output, meets an input, or flows into an op this
module does not understand is left fixed: the derivation is conservative, never wrong in a
way the spec check (:func:`merge_cli.align.spec.check_spec`) would not catch.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from math import prod

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from merge_cli.align.spec import STATISTICS, AxisRef, Group, PermutationSpec
from merge_cli.errors import PlanError

_PASS_MODULES = (
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Dropout,
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_PASS_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.gelu,
    F.silu,
    torch.tanh,
    torch.sigmoid,
    F.dropout,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.leaky_relu,
}
_PASS_METHODS = {"relu", "tanh", "sigmoid", "contiguous"}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


@dataclass
class _Units:
    """A union-find node: one candidate group of units."""

    size: int
    axes: list[AxisRef] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    normed: bool = False
    fixed: bool = False
    parent: _Units | None = None

    def root(self) -> _Units:
        node = self
        while node.parent is not None:
            node = node.parent
        return node


def _union(a: _Units, b: _Units) -> _Units:
    a, b = a.root(), b.root()
    if a is b:
        return a
    if a.size != b.size:
        a.fixed = b.fixed = True
    b.parent = a
    a.axes += b.axes
    a.sites += b.sites
    a.producers += b.producers
    a.normed |= b.normed
    a.fixed |= b.fixed
    return a


def derive_spec(model: nn.Module, example_input: torch.Tensor) -> PermutationSpec:
    """The permutation spec of ``model``'s graph (see the module docstring)."""
    try:
        graph = fx.symbolic_trace(model)
        ShapeProp(graph).propagate(example_input)
    except Exception as error:  # tracing fails on data-dependent control flow
        raise PlanError(
            f"spec: auto could not trace task.model with torch.fx ({error}); "
            "name a built-in spec (mlp, cnn, resnet, llama) or a spec file"
        ) from error
    walk = _Walk(graph)
    for node in graph.graph.nodes:
        entry = walk.of(node.args[0]) if node.args else None
        if node.op == "call_module":
            walk.module_node(node, entry)
        elif node.op in ("call_function", "call_method"):
            walk.function_node(node, entry)
        elif node.op == "output":
            walk.freeze(node)
    return PermutationSpec(tuple(walk.groups()), name="auto")


class _Walk:
    """The forward walk over a traced graph: which units each node's output carries."""

    def __init__(self, graph: fx.GraphModule) -> None:
        self.graph = graph
        self.units: dict[fx.Node, tuple[_Units, int] | None] = {}
        self.every: list[_Units] = []

    def of(self, arg: object) -> tuple[_Units, int] | None:
        return self.units.get(arg) if isinstance(arg, fx.Node) else None

    def freeze(self, node: fx.Node) -> None:
        """The units flowing into ``node`` leave the understood ops: keep them fixed."""
        for arg in node.all_input_nodes:
            if (entry := self.units.get(arg)) is not None:
                entry[0].root().fixed = True

    def module_node(self, node: fx.Node, entry: tuple[_Units, int] | None) -> None:
        module = self.graph.get_submodule(node.target)
        name = str(node.target)
        if (
            isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d)
            and getattr(module, "groups", 1) == 1
        ):
            if entry is not None:
                group, block = entry
                group.root().axes.append(AxisRef(f"{name}.weight", 1, block, "in"))
            new = _Units(module.weight.shape[0], sites=[name], producers=[name])
            new.axes.append(AxisRef(f"{name}.weight", 0))
            if module.bias is not None:
                new.axes.append(AxisRef(f"{name}.bias", 0))
            self.every.append(new)
            self.units[node] = (new, 1)
        elif isinstance(module, _NORMS) and entry is not None and _norm_fits(module, node, entry):
            group = entry[0].root()
            for tensor_name, _ in module.named_parameters():
                if tensor_name in ("weight", "bias"):
                    group.axes.append(AxisRef(f"{name}.{tensor_name}", 0))
            for tensor_name, _ in module.named_buffers():
                if tensor_name in STATISTICS:
                    group.axes.append(AxisRef(f"{name}.{tensor_name}", 0, statistic=True))
            group.sites = [name] if len(group.producers) == 1 else group.sites
            group.normed = True
            self.units[node] = entry
        elif isinstance(module, _PASS_MODULES):
            self.units[node] = entry
        elif isinstance(module, nn.Flatten) and entry is not None:
            self.units[node] = _flatten(node, entry)
        else:
            self.freeze(node)

    def function_node(self, node: fx.Node, entry: tuple[_Units, int] | None) -> None:
        target = node.target
        if target in _PASS_FUNCTIONS or target in _PASS_METHODS:
            self.units[node] = entry
        elif target in (operator.add, torch.add, operator.iadd, "add"):
            left, right = self.of(node.args[0]), self.of(node.args[1])
            if left is not None and right is not None and left[1] == right[1]:
                self.units[node] = (_union(left[0], right[0]), left[1])
            elif left is None and right is None:
                self.units[node] = None
            else:
                self.freeze(node)
        elif target in (torch.flatten, "flatten", "view", "reshape") and entry is not None:
            self.units[node] = _flatten(node, entry)
        else:
            self.freeze(node)

    def groups(self) -> list[Group]:
        """One group per set of units that can be permuted (not fixed), in graph order."""
        groups = []
        seen: set[int] = set()
        for candidate in self.every:
            root = candidate.root()
            if id(root) in seen or root.fixed:
                continue
            seen.add(id(root))
            producer = root.producers[0] if len(root.producers) == 1 and not root.normed else None
            groups.append(
                Group(
                    root.producers[0],
                    root.size,
                    tuple(root.axes),
                    None,
                    tuple(root.sites),
                    1,
                    producer,
                )
            )
        return groups


def _norm_fits(module: nn.Module, node: fx.Node, entry: tuple[_Units, int]) -> bool:
    """A norm is per-unit when it normalises the unit axis (dim 1; LayerNorm: last dim)."""
    size = entry[0].root().size
    if isinstance(module, nn.LayerNorm):
        return tuple(module.normalized_shape) == (size,) and entry[1] == 1 and _ndim(node) == 2
    if isinstance(module, nn.GroupNorm):
        return module.num_groups == module.num_channels == size and entry[1] == 1
    return module.num_features == size and entry[1] == 1


def _ndim(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None else -1


def _flatten(node: fx.Node, entry: tuple[_Units, int]) -> tuple[_Units, int] | None:
    """After flattening ``[B, C, *spatial]`` to ``[B, C * prod(spatial)]`` units span blocks."""
    source = node.args[0]
    before = source.meta.get("tensor_meta") if isinstance(source, fx.Node) else None
    after = node.meta.get("tensor_meta")
    group, block = entry
    if (
        before is None
        or after is None
        or len(after.shape) != 2
        or before.shape[0] != after.shape[0]
    ):
        group.root().fixed = True
        return None
    if len(before.shape) == 2:
        return entry
    return group, block * prod(before.shape[2:])
