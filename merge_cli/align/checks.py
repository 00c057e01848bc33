"""Recipe checks for the ``align`` section (called from :mod:`merge_cli.checks`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from merge_cli.align import ALIGNERS
from merge_cli.recipe import Recipe

SPEC_NAMES = ("auto", "mlp", "cnn", "resnet", "llama")


def reference_name(recipe: Recipe) -> str:
    """The model the others are aligned to: ``align.reference``, else the fuse base, else
    the first model."""
    assert recipe.align is not None
    if recipe.align.reference is not None:
        return recipe.align.reference
    if recipe.fuse is not None and recipe.fuse.base is not None:
        return recipe.fuse.base
    return next(iter(recipe.models))


def check_align(recipe: Recipe) -> list[str]:
    """Parameters, data needs, the spec name and ZipIt!'s fuse constraint."""
    spec = recipe.align
    assert spec is not None and spec.method in ALIGNERS
    aligner = ALIGNERS[spec.method]
    problems = []
    try:
        params = aligner.params.model_validate(spec.params)
    except ValidationError as error:
        for item in error.errors():
            where = ".".join(str(p) for p in item["loc"])
            problems.append(f"align.params.{where}: {item['msg']}")
        return problems
    reference = reference_name(recipe)
    task = recipe.task_for(reference)
    wants_data = aligner.needs_data(params) or spec.repair
    if wants_data and (task is None or task.model is None or task.data is None):
        what = f"method {spec.method!r}" if aligner.needs_data(params) else "repair"
        problems.append(f"task: align {what} needs task.model and task.data")
    if spec.spec not in SPEC_NAMES and not Path(spec.spec).is_file():
        problems.append(
            f"align.spec: {spec.spec!r} is neither a built-in spec ({', '.join(SPEC_NAMES)}) "
            "nor an existing spec file"
        )
    if spec.repair and recipe.fuse is None:
        problems.append("align.repair: corrects the fused model, so it needs a fuse stage")
    if aligner.zips:
        problems += _check_zip_fuse(recipe, reference)
        if spec.repair:
            problems.append(
                "align.repair: not supported with zipit (its views are not models whose "
                "statistics REPAIR could interpolate)"
            )
    return problems


def _check_zip_fuse(recipe: Recipe, reference: str) -> list[str]:
    """ZipIt!'s views are only meaningful averaged uniformly (see merge_cli.align.zipit)."""
    fuse = recipe.fuse
    needed = "fuse: {method: linear} over the two aligned models with equal weights"
    if len(recipe.models) != 2:
        return [f"align.method: zipit merges exactly two models, got {len(recipe.models)}"]
    if fuse is None or fuse.method != "linear" or fuse.base is not None:
        return [f"align.method: zipit produces the merged model through {needed}"]
    fused = fuse.model_names(list(recipe.models))
    weights = {float(fuse.model_values(n).get("weight", 1.0)) for n in fused}
    if (
        sorted(fused) != sorted(recipe.models)
        or len(weights) != 1
        or fuse.params.get("normalize", True) is not True
        or fuse.rules
    ):
        return [f"align.method: zipit needs {needed} (no rules)"]
    return []
