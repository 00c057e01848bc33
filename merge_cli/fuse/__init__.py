"""Fuse stage: the method registry, by kind.

* :mod:`merge_cli.fuse.tensorwise`: per-tensor weight averaging, streamed by the engine;
* :mod:`merge_cli.fuse.datamerge`: data-aware whole-model methods;
* :mod:`merge_cli.fuse.ensembles`: output ensembles, MoE assembly and distillation;
* :mod:`merge_cli.fuse.planning`: from a recipe's fuse section to a streaming plan;
* :mod:`merge_cli.fuse.checks`: the fuse section's cross-field recipe checks.

Adding a method: write a module with a plain function and one entry
(:class:`~merge_cli.engine.method.TensorMethod` or
:class:`~merge_cli.engine.method.ModelMethod`) in the package of its kind, and list the entry
in that package's registry (or below, for the ensembles).
"""

from __future__ import annotations

from merge_cli.engine.method import Method
from merge_cli.fuse.datamerge import DATA_METHODS
from merge_cli.fuse.ensembles import distill, ensemble, moe
from merge_cli.fuse.tensorwise import TENSOR_METHODS

#: Every available fuse method by name.
METHODS: dict[str, Method] = {
    **TENSOR_METHODS,
    **DATA_METHODS,
    ensemble.METHOD.name: ensemble.METHOD,
    moe.METHOD.name: moe.METHOD,
    distill.METHOD.name: distill.METHOD,
}

__all__ = ["METHODS"]
