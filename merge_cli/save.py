"""The save stage: a fused model into its output directory.

Streaming plans run through the executor into the sharded writer (a temporary sibling
directory, renamed into place when complete); a whole-model method's result is saved the
same way, as a plan of copied tensors. Beside the weights: the base's config and tokenizer
files (``save.copy_files``), config updates the plan asks for, a report, and the model card.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from merge_cli.engine.executor import ExecutionOptions, execute
from merge_cli.engine.method import MethodInfo, TensorMethod, copy_first
from merge_cli.engine.plan import MergePlan, OutputTensor, output_dtype, split_into_shards
from merge_cli.engine.quantize import quantization_updates
from merge_cli.errors import OutputError, PlanError
from merge_cli.io.checkpoint import Checkpoint, TensorInfo
from merge_cli.io.resolve import HUB_PREFIX, parse_hub_reference
from merge_cli.io.writer import ShardedWriter
from merge_cli.options import RunOptions
from merge_cli.recipe import Recipe
from merge_cli.task.ensemble import MANIFEST
from merge_cli.version import __version__

#: File in the output directory holding a whole-model method's report (learned coefficients).
REPORT_FILE = "merge_report.json"
#: The writer's buffer, in chunk budgets (16 MiB by default): the bytes of a direct write.
WRITE_BUFFER_CHUNKS = 2
#: The method that writes a whole-model method's result: every tensor is copied.
COPY_TENSORS = TensorMethod(
    name="passthrough",
    family="weight_average",
    summary="Copy every tensor of one checkpoint unchanged.",
    reference="merge-cli",
    merge=copy_first,
)


#: Files whose presence marks a directory as a checkpoint or ensemble merge-cli may replace.
OUTPUT_MARKERS = ("model.safetensors.index.json", "model.safetensors", MANIFEST)
#: How much of a README.md is read to see whether it is merge-cli's model card.
CARD_PROBE_BYTES = 4096


def input_paths(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> list[Path]:
    """Every path a run reads its models from: each local reference and each checkpoint's
    directory (a Hub model's snapshot directory included)."""
    paths = [
        Path(entry.path).expanduser()
        for entry in recipe.models.values()
        if not entry.path.startswith("hf://")
    ]
    paths += [c.directory for c in checkpoints.values() if c.directory is not None]
    return paths


def check_output_target(target: Path, protected: Iterable[Path], overwrite: bool) -> None:
    """Refuse an output directory that would destroy what the user did not ask to replace.

    ``target`` may not be, or contain, any of ``protected`` (the inputs, the recipe): the
    old directory is deleted when the new one is in place. With ``overwrite``, an existing
    ``target`` must be an earlier merge-cli output (empty, or holding a merge-cli model
    card, a safetensors checkpoint or an ensemble manifest).
    """
    real = Path(os.path.realpath(target))
    for path in protected:
        resolved = Path(os.path.realpath(path))
        if real == resolved or real in resolved.parents:
            relation = "is" if real == resolved else "contains"
            raise OutputError(
                f"{target}: the output directory {relation} {path}, an input of this run; "
                "writing there would delete it; choose another --out"
            )
    if overwrite and target.is_dir() and not is_merge_cli_output(target):
        raise OutputError(
            f"{target}: exists and is not a merge-cli output (no merge-cli model card, "
            "checkpoint or ensemble manifest); --overwrite only replaces an earlier output, "
            "so remove this directory yourself or choose another --out"
        )


def is_merge_cli_output(directory: Path) -> bool:
    """Whether ``directory`` is empty or looks like an output merge-cli wrote."""
    try:
        entries = {path.name: path for path in directory.iterdir()}
    except OSError:
        return False
    if not entries or any(name in entries for name in OUTPUT_MARKERS):
        return True
    card = entries.get("README.md")
    if card is None or not card.is_file():
        return False
    try:
        with open(card, "rb") as handle:
            head = handle.read(CARD_PROBE_BYTES)
    except OSError:
        return False
    return b"merge-cli" in head


def save_streaming(
    recipe: Recipe,
    plan: MergePlan,
    method: TensorMethod,
    checkpoints: dict[str, Checkpoint],
    options: RunOptions,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Execute a streaming merge into the recipe's output directory.

    ``files`` (name -> contents) are written after the copied config/tokenizer files,
    replacing those of the same name.
    """
    assert recipe.save is not None and recipe.fuse is not None
    return _write_plan(
        recipe,
        plan,
        method,
        plan.sources(checkpoints),
        checkpoints[plan.config_source],
        options,
        ExecutionOptions(
            device=options.device,
            chunk_bytes=options.chunk_bytes,
            threads=options.threads,
            allow_nonfinite=options.allow_nonfinite,
        ),
        files=files,
        card=CardInputs(method, checkpoints),
    )


def _write_plan(
    recipe: Recipe,
    plan: MergePlan,
    method: TensorMethod,
    sources: dict[str, Checkpoint],
    config_source: Checkpoint,
    options: RunOptions,
    execution: ExecutionOptions,
    report: dict[str, Any] | None = None,
    files: dict[str, bytes] | None = None,
    card: CardInputs | None = None,
) -> Path:
    """Run ``plan`` into the recipe's output directory (temp sibling, renamed when done)."""
    assert recipe.save is not None and recipe.fuse is not None
    target = Path(recipe.save.path)
    shards = [[TensorInfo(t.name, t.shape, t.dtype) for t in shard] for shard in plan.shards]
    with ShardedWriter(
        target,
        shards,
        plan.shard_file_names(),
        options.overwrite,
        buffer_bytes=WRITE_BUFFER_CHUNKS * options.chunk_bytes,
        # an output of copied tensors only (passthrough) goes file to file in the kernel
        direct=any(tensor.copy_from is None for tensor in plan.tensors),
    ) as writer:
        execute(plan, method, recipe.fuse, sources, writer, execution, options.progress)
        write_extras(recipe, writer, config_source, plan.config_updates, card)
        if report:
            writer.write_text(REPORT_FILE, json.dumps(report, indent=2) + "\n")
        for relative, data in (files or {}).items():
            writer.write_bytes(relative, data)
        return writer.finish()


def save_checkpoint(
    recipe: Recipe,
    merged: Checkpoint,
    checkpoints: dict[str, Checkpoint],
    options: RunOptions,
    config_source: str | None = None,
    config_updates: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    files: dict[str, bytes] | None = None,
    method: MethodInfo | None = None,
) -> Path:
    """Save a whole-model method's result (any Checkpoint) through the streaming writer.

    A non-empty ``report`` is written beside the weights as :data:`REPORT_FILE`, and
    ``files`` (relative path -> contents) inside the output directory.
    """
    assert recipe.save is not None and recipe.fuse is not None
    tensors = []
    for name in merged.tensor_names():
        info = merged.info(name)
        tensors.append(
            OutputTensor(
                name,
                info.shape,
                output_dtype(info.dtype, recipe.save.dtype),
                copy_from=("merged", name),
            )
        )
    if not tensors:
        raise PlanError(f"fuse ({recipe.fuse.method}) produced no tensors")
    plan = MergePlan(
        tensors=tensors,
        shards=split_into_shards(tensors, int(recipe.save.shard_size)),
        model_names=["merged"],
        base=None,
        config_source="merged",
        config_updates=config_updates or {},
    )
    source = config_source or recipe.fuse.base or recipe.fuse.model_names(list(recipe.models))[0]
    # the result of dequantized inputs is plain floating point: no quantization_config
    plan.config_updates = {**quantization_updates(checkpoints[source], None), **plan.config_updates}
    return _write_plan(
        recipe,
        plan,
        COPY_TENSORS,
        {"merged": merged},
        checkpoints[source],
        options,
        ExecutionOptions(
            device="cpu",
            chunk_bytes=options.chunk_bytes,
            threads=options.threads,
            allow_nonfinite=options.allow_nonfinite,
        ),
        report,
        files,
        CardInputs(method, checkpoints),
    )


def write_extras(
    recipe: Recipe,
    writer: ShardedWriter,
    config_source: Checkpoint,
    config_updates: dict[str, Any],
    card: CardInputs | None = None,
) -> None:
    """Copy config/tokenizer files, apply config updates (and ``save.dtype`` as
    config.json's ``torch_dtype``/``dtype``), write the user's own recipe file(s) and the
    model card."""
    assert recipe.save is not None
    directory = config_source.directory
    copied: set[str] = set()
    if directory is not None and directory.is_dir():
        for path in sorted(directory.iterdir()):
            if not path.is_file() or path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
                continue
            if path.name in (
                "README.md",
                "model.safetensors.index.json",
                "pytorch_model.bin.index.json",
            ):
                continue
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in recipe.save.copy_files):
                writer.copy_file(path, path.name)
                copied.add(path.name)
    if config_updates and "config.json" not in copied:
        raise OutputError(f"{config_source.source}: no config.json to update with {config_updates}")
    updates = dict(config_updates)
    if recipe.save.dtype != "keep" and "config.json" in copied:
        updates.update(_dtype_updates(_read_config(writer.temp) or {}, recipe.save.dtype))
    if updates:
        config = json.loads((writer.temp / "config.json").read_text())
        for key, value in updates.items():  # None removes a key
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        writer.write_text("config.json", json.dumps(config, indent=2) + "\n")
    for name, text in recipe.origin.files.items():
        writer.write_text(name, text)
    if recipe.save.model_card:
        card = card or CardInputs()
        writer.write_text("README.md", model_card(recipe, card, _read_config(writer.temp)))


def _dtype_updates(config: dict[str, Any], dtype: str) -> dict[str, str]:
    """config.json's dtype keys for shards of ``dtype``: transformers reads ``dtype``
    (>= 4.56) or ``torch_dtype`` (before), so both are written, and from_pretrained
    (dtype="auto") loads what the shards hold; nothing when the config already says so."""
    present = [config[key] for key in ("torch_dtype", "dtype") if key in config]
    if present and all(value == dtype for value in present):
        return {}
    return {"torch_dtype": dtype, "dtype": dtype}


# ---------------------------------------------------------------------------------------
# The model card (Hub conventions: https://huggingface.co/docs/hub/model-cards)

#: The user's recipe as written, saved beside the weights; and a mergekit configuration.
RECIPE_FILE = "merge_recipe.yaml"
MERGEKIT_FILE = "mergekit_config.yml"


class CardInputs:
    """What the card says besides the recipe: the method's registry entry (paper) and the
    opened inputs (their directories hold the licenses of their own cards)."""

    def __init__(
        self, method: MethodInfo | None = None, inputs: dict[str, Checkpoint] | None = None
    ):
        self.method = method
        self.inputs = inputs or {}


def hub_ids(recipe: Recipe) -> dict[str, str]:
    """Model name -> Hub repo id, for the inputs given as ``hf://org/name[@rev]`` (local
    paths have none: a card never names them in ``base_model``)."""
    return {
        name: parse_hub_reference(entry.path)[0]
        for name, entry in recipe.models.items()
        if entry.path.startswith(HUB_PREFIX)
    }


def input_license(checkpoint: Checkpoint) -> str | None:
    """The ``license`` of an input's own card (README.md front matter), if it has one."""
    from huggingface_hub import metadata_load

    directory = checkpoint.directory
    card = directory / "README.md" if directory is not None else None
    if card is None or not card.is_file():
        return None
    try:
        value = (metadata_load(card) or {}).get("license")
    except Exception:  # a card whose front matter is not YAML: no license to agree on
        return None
    return value if isinstance(value, str) else None


def card_metadata(
    recipe: Recipe,
    card: CardInputs,
    config: dict[str, Any] | None,
    evaluation: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The card's YAML front matter: ``base_model`` (the Hub ids of the inputs) with
    ``base_model_relation: merge``, ``library_name`` (transformers when config.json names a
    model type or architecture), tags, the license when every input's card gives the same
    one, and the merged model's evaluation results as ``model-index``."""
    from huggingface_hub import EvalResult, ModelCardData

    method = recipe.fuse.method if recipe.fuse else None
    ids = list(dict.fromkeys(hub_ids(recipe).values()))
    licenses = {input_license(checkpoint) for checkpoint in card.inputs.values()}
    transformers = bool(config) and any(k in config for k in ("model_type", "architectures"))
    results = []
    task = _task_type(config)
    for row in evaluation or []:
        if row.get("model") == "merged" and isinstance(row.get("value"), int | float):
            split = str(row.get("split") or "evaluation")
            results.append(
                EvalResult(
                    task_type=task,
                    dataset_type=split,
                    dataset_name=split,
                    metric_type=str(row["metric"]),
                    metric_name=str(row["metric"]),
                    metric_value=row["value"],
                )
            )
    data = ModelCardData(
        base_model=ids or None,
        library_name="transformers" if transformers else None,
        license=licenses.pop() if len(licenses) == 1 and None not in licenses else None,
        tags=["merge", "merge-cli", *([method] if method else [])],
        eval_results=results or None,
        model_name=_model_name(recipe) if results else None,
    )
    metadata = data.to_dict()
    if ids:
        metadata["base_model_relation"] = "merge"
    return metadata


def _task_type(config: dict[str, Any] | None) -> str:
    architectures = (config or {}).get("architectures") or []
    if any(str(a).endswith("ForCausalLM") for a in architectures):
        return "text-generation"
    return "other"


def _model_name(recipe: Recipe) -> str:
    assert recipe.save is not None
    if recipe.save.push_to_hub is not None:
        return recipe.save.push_to_hub.repo_id.split("/")[-1]
    return Path(recipe.save.path).name


def model_card(
    recipe: Recipe,
    card: CardInputs | None = None,
    config: dict[str, Any] | None = None,
    evaluation: list[dict[str, Any]] | None = None,
) -> str:
    """A Hugging Face model card: the front matter of :func:`card_metadata`, then the
    method with its paper, the base, the models, the evaluation results and the recipe."""
    card = card or CardInputs()
    metadata = card_metadata(recipe, card, config, evaluation)
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)
    recipe_yaml = yaml.safe_dump(
        recipe.model_dump(mode="json", exclude_defaults=True), sort_keys=False
    )
    ids = hub_ids(recipe)
    spec = recipe.fuse
    lines = [f"# {_model_name(recipe)}", ""]
    lines.append(f"This model is a merge made with merge-cli {__version__}.")
    lines.append("")
    if spec is not None:
        lines += ["## Method", "", f"`{spec.method}`" + _paper(card.method), ""]
        if spec.base is not None:
            lines += [f"Base model: {_describe(spec.base, ids)}", ""]
    lines += ["## Models", ""]
    fused = set(spec.model_names(list(recipe.models))) if spec is not None else set(recipe.models)
    for name in recipe.models:
        role = " (base)" if spec is not None and name == spec.base else ""
        role = role or ("" if name in fused else " (not fused)")
        adapter = recipe.models[name].lora
        if adapter is not None:
            role += " with the LoRA adapter " + (
                f"[{adapter.removeprefix('hf://')}](https://huggingface.co/"
                f"{adapter.removeprefix('hf://').partition('@')[0]})"
                if adapter.startswith("hf://")
                else "(a local adapter)"
            )
        lines.append(f"- {_describe(name, ids)}{role}")
    lines.append("")
    rows = evaluation or []
    if rows:
        lines += ["## Evaluation", "", *_table(rows), ""]
    lines += ["## Recipe", ""]
    for name in recipe.origin.files:
        lines.append(f"The file as written is saved beside the weights: `{name}`.")
    lines += ["", "```yaml", recipe_yaml.rstrip("\n"), "```", ""]
    return f"---\n{front}---\n\n" + "\n".join(lines)


def _paper(method: MethodInfo | None) -> str:
    if method is None:
        return ""
    link = f" ([paper]({method.url}))" if method.url else ""
    return f": {method.summary} {method.reference}{link}."


def _describe(name: str, ids: dict[str, str]) -> str:
    if name in ids:
        return f"`{name}`: [{ids[name]}](https://huggingface.co/{ids[name]})"
    return f"`{name}`: a local checkpoint"


def _table(rows: list[dict[str, Any]]) -> list[str]:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [_cell(row.get(key)) for key in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value).replace("|", "\\|")


def _read_config(directory: Path) -> dict[str, Any] | None:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def update_model_card(
    recipe: Recipe,
    output: Path,
    card: CardInputs,
    evaluation: list[dict[str, Any]],
) -> None:
    """Rewrite a finished output's card with the evaluation results (the evaluate stage
    runs on the saved output). Replaced atomically: the card is never half-written."""
    if not recipe.save or not recipe.save.model_card or not (output / "README.md").exists():
        return
    text = model_card(recipe, card, _read_config(output), evaluation)
    temp = output / ".README.md.tmp"
    temp.write_text(text)
    os.replace(temp, output / "README.md")
