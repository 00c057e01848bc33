"""What merge-cli knows of each mergekit 0.1.5 method: base use, parameters, defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from merge_cli.fuse import METHODS
from merge_cli.mergekit.parameters import map_values

#: How a mergekit method uses ``base_model`` (mergekit's ``InputContract.base``).
BaseUse = Literal["required", "optional", "ignored"]


@dataclass(frozen=True)
class MergekitMethod:
    """What merge-cli needs to know of one mergekit 0.1.5 method.

    ``defaults`` are mergekit's parameter defaults (``REQUIRED`` where it has none);
    ``per_model`` names those set per input model. ``no_effect`` maps a parameter to the value
    at which it changes nothing (dropped; any other value is unsupported); ``ignored`` are
    parameters mergekit accepts and ignores for this method; ``unused`` are those it accepts
    and ignores though a user may expect an effect (a per-model ``weight`` given to slerp):
    dropped with a warning, so a mergekit file runs as it is; ``values`` maps mergekit values
    to merge-cli's; ``fixed`` are merge-cli parameters that select mergekit's behaviour.
    """

    base: BaseUse
    defaults: dict[str, Any] = field(default_factory=dict)
    per_model: tuple[str, ...] = ()
    no_effect: dict[str, Any] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()
    values: dict[str, dict[Any, Any]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def shared(self) -> tuple[str, ...]:
        return tuple(k for k in self.defaults if k not in self.per_model)


REQUIRED = object()


def _task_vectors(
    normalize: bool,
    rescale: bool,
    extra: dict[str, float] | None = None,
    *,
    ignored: tuple[str, ...] = (),
    **options: Any,
) -> MergekitMethod:
    """mergekit's ``GeneralizedTaskArithmeticMerge`` family (its defaults differ by method)."""
    extra = extra or {}
    return MergekitMethod(
        "required",
        {
            "normalize": normalize,
            "rescale": rescale,
            "lambda": 1.0,
            "int8_mask": False,
            "weight": REQUIRED,
            "density": 1.0,
            **extra,
        },
        per_model=("weight", "density", *extra),
        # The int8 mask is a storage option of mergekit's: the result is the same either way.
        ignored=("int8_mask", *ignored),
        **options,
    )


# mergekit's ``rescale: true`` after magnitude trimming (L1-norm matching) is not supported.
_SPARSE_MAGNITUDE: dict[str, Any] = {"no_effect": {"rescale": False}}
# mergekit's DARE/DELLA ``rescale: true`` matches the L1 norm of the pruned task vector.
_RESCALE_L1: dict[str, Any] = {"values": {"rescale": {True: "l1"}}}
_OUTLIERS: dict[str, Any] = {"fixed": {"empty_without_outliers": True}}

#: mergekit 0.1.5 methods merge-cli runs, with their parameters and defaults.
MERGEKIT_METHODS: dict[str, MergekitMethod] = {
    "linear": MergekitMethod("ignored", {"normalize": True, "weight": REQUIRED}, ("weight",)),
    "passthrough": MergekitMethod("ignored", {"scale": None}, ("scale",)),
    # Without sparsification mergekit ignores density and rescale.
    "task_arithmetic": _task_vectors(False, False, ignored=("density", "rescale")),
    "ties": _task_vectors(True, False, **_SPARSE_MAGNITUDE),
    "dare_ties": _task_vectors(False, True, **_RESCALE_L1),
    "dare_linear": _task_vectors(False, True, **_RESCALE_L1),
    "breadcrumbs": _task_vectors(False, False, {"gamma": 0.01}, **_SPARSE_MAGNITUDE, **_OUTLIERS),
    "breadcrumbs_ties": _task_vectors(
        False, False, {"gamma": 0.01}, **_SPARSE_MAGNITUDE, **_OUTLIERS
    ),
    "della": _task_vectors(True, True, {"epsilon": 0.15}, **_RESCALE_L1),
    "della_linear": _task_vectors(False, True, {"epsilon": 0.15}, **_RESCALE_L1),
    # mergekit 0.1.5 reads no per-model weight in slerp, karcher, model_stock or sce (its
    # tests give them one all the same).
    "slerp": MergekitMethod("required", {"t": REQUIRED}, unused=("weight",)),
    "nuslerp": MergekitMethod(
        "optional",
        {"nuslerp_row_wise": False, "nuslerp_flatten": True, "weight": REQUIRED},
        ("weight",),
    ),
    "multislerp": MergekitMethod(
        "optional", {"normalize_weights": True, "eps": 1e-8, "weight": REQUIRED}, ("weight",)
    ),
    "karcher": MergekitMethod("ignored", {"max_iter": 10, "tol": 1e-5}, unused=("weight",)),
    "model_stock": MergekitMethod("required", {"filter_wise": False}, unused=("weight",)),
    # NearSwap reads no per-model weight either (mergekit's own test gives one).
    "nearswap": MergekitMethod("required", {"t": REQUIRED}, unused=("weight",)),
    "ram": MergekitMethod("required", {"epsilon": 1e-5}, unused=("weight",)),
    "ramplus_tl": MergekitMethod(
        "required", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, unused=("weight",)
    ),
    "sce": MergekitMethod(
        "required",
        {"select_topk": 1.0, "int8_mask": False},
        ignored=("int8_mask",),
        unused=("weight",),
    ),
}


def mergekit_defaults(method_name: str, method: MergekitMethod) -> dict[str, Any]:
    """mergekit's defaults where merge-cli's differ, and the options that pick its behaviour.

    The lowest level of the parameter chain: any value set in the configuration wins.
    """
    ours = METHODS.get(method_name)
    if ours is None:
        return {}
    fields = {**ours.model_params.model_fields, **ours.params.model_fields}
    defaults = {}
    for key, value in method.defaults.items():
        if value is REQUIRED or key in method.ignored or key in method.no_effect:
            continue
        if key not in fields or fields[key].is_required():
            continue
        value = map_values(value, method.values.get(key, {}))
        if fields[key].get_default(call_default_factory=True) != value:
            defaults[key] = value
    return {**defaults, **method.fixed}
