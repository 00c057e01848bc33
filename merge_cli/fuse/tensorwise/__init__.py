"""Per-tensor (streaming) weight-averaging methods: one module per method, each a plain
function and a :class:`~merge_cli.engine.method.TensorMethod` entry."""

from __future__ import annotations

from merge_cli.engine.method import TensorMethod
from merge_cli.fuse.tensorwise import (
    breadcrumbs,
    consensus,
    dare,
    della,
    iso,
    linear,
    localize_stitch,
    model_stock,
    multislerp,
    nearswap,
    passthrough,
    ram,
    sce,
    slerp,
    svc,
    task_arithmetic,
    ties,
    tsv,
    wudi,
)

#: Every per-tensor weight-averaging method by name, in the order ``merge-cli methods`` lists.
TENSOR_METHODS: dict[str, TensorMethod] = {
    method.name: method
    for method in (
        linear.METHOD,
        passthrough.METHOD,
        task_arithmetic.METHOD,
        ties.METHOD,
        *dare.METHODS,
        *breadcrumbs.METHODS,
        *della.METHODS,
        *slerp.METHODS,
        *multislerp.METHODS,
        model_stock.METHOD,
        sce.METHOD,
        nearswap.METHOD,
        *ram.METHODS,
        tsv.METHOD,
        *iso.METHODS,
        *consensus.METHODS,
        wudi.METHOD,
        localize_stitch.METHOD,
        *svc.METHODS,
    )
}
