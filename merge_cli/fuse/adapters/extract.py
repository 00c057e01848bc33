"""Extracting a LoRA adapter from a fine-tune (or a merge): ``merge-cli extract-lora``.

The task vector ``Δ = W_model − W_base`` of every weight matrix is factored by a truncated
singular value decomposition, ``Δ ≈ U_r·S_r·V_rᵀ``, the best rank-``r`` approximation in the
Frobenius norm (Eckart–Young), written as a LoRA pair (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models"): ``B = U_r·√S_r``, ``A = √S_r·V_rᵀ``, with
``lora_alpha = r`` so that PEFT's scale is 1 and ``W_base + B·A`` is the approximation. This is
what mergekit's ``mergekit-extract-lora`` does; the output is a PEFT adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``PeftModel.from_pretrained``
loads and merge-cli applies as a ``lora:`` input.

Per matrix the rank is ``rank`` at most, fewer where the matrix is smaller, and, with
``sv_epsilon``, only the singular values above ``sv_epsilon · σ_max``. What cannot be written
as a low-rank pair is saved whole through PEFT's ``modules_to_save``: changed vectors (norms;
biases, unless every decomposed layer has one: then they go to PEFT's ``lora_B.bias``),
changed embeddings unless ``embeddings`` is set (then they get LoRA embedding pairs too,
``lora_embedding_A/B``), and tensors of other ranks. Each matrix is reported with the
share of its squared singular values kept (retained energy) and the relative Frobenius error
``‖Δ − B·A‖ / ‖Δ‖ = √(1 − energy)``.

Matrices are read and decomposed one at a time (on ``device``), so memory holds one
matrix's decomposition and the factors kept, never a model; tensors kept whole are copied
into the output in row chunks.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge_cli.errors import CheckpointError, PlanError
from merge_cli.io.adapters import (
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    adapter_tensor_names,
    lora_config,
    write_adapter,
)
from merge_cli.io.checkpoint import Checkpoint, TensorInfo
from merge_cli.io.dtypes import is_float
from merge_cli.options import DEFAULT_CHUNK_BYTES, RunOptions
from merge_cli.progress import NullProgress, Progress
from merge_cli.recipe import Recipe

#: Module names (their last component) of embedding layers: PEFT adapts them with
#: ``lora_embedding_A/B``, whose product is transposed.
EMBEDDING_MODULE = re.compile(
    r"(^|\.)(embed_tokens|embed_in|wte|wpe|word_embeddings|position_embeddings"
    r"|token_type_embeddings|embed_positions|shared)$"
)
REPORT_FILE = "extract_report.json"


@dataclass(frozen=True)
class ExtractOptions:
    """What ``merge-cli extract-lora`` sets."""

    rank: int
    sv_epsilon: float = 0.0
    embeddings: bool = False
    device: str = "cpu"
    overwrite: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    progress: Progress = field(default_factory=NullProgress)


@dataclass
class TensorReport:
    """How one tensor of the model went into the adapter.

    ``kind``: ``lora`` or ``embedding`` (a low-rank pair), ``lora_bias`` (a decomposed
    layer's changed bias, as PEFT's ``lora_B.bias``), ``modules_to_save`` (kept whole),
    ``unchanged`` (equal to the base), ``dropped`` (every singular value below the threshold).
    """

    name: str
    shape: list[int]
    kind: str
    rank: int = 0
    energy: float = 1.0
    relative_error: float = 0.0


@dataclass
class _Pair:
    module: str
    embedding: bool
    a: torch.Tensor
    b: torch.Tensor


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def truncated_factors(
    delta: torch.Tensor, rank: int, sv_epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(B, A, retained energy)`` with ``B·A`` the best approximation of ``delta`` of rank at
    most ``rank`` keeping singular values above ``sv_epsilon · σ_max``; None when none is."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return None
    keep = int((s > sv_epsilon * s[0]).sum()) if sv_epsilon > 0 else s.numel()
    r = min(rank, keep, s.numel())
    if r == 0:
        return None
    energy = float((s[:r].double() ** 2).sum() / (s.double() ** 2).sum())
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r], energy


def extract_lora(
    model: Checkpoint,
    base: Checkpoint,
    out: Path,
    options: ExtractOptions,
    base_reference: str | None = None,
) -> list[TensorReport]:
    """Write at ``out`` the LoRA adapter of ``base`` that best approximates ``model`` at
    ``options.rank``; return the per-tensor report (also saved as ``extract_report.json``)."""
    if options.rank < 1:
        raise PlanError(f"--rank: must be at least 1, got {options.rank}")
    if options.sv_epsilon < 0 or options.sv_epsilon >= 1:
        raise PlanError(f"--sv-epsilon: must be in [0, 1), got {options.sv_epsilon}")
    names = _check_inputs(model, base)
    progress = options.progress
    progress.start("extracting LoRA", sum(model.info(n).nbytes for n in names))
    reports: list[TensorReport] = []
    pairs: dict[str, _Pair] = {}
    whole: set[str] = set()  # modules kept whole (modules_to_save)
    for name in names:
        report, pair = _extract_tensor(model, base, name, options)
        reports.append(report)
        if pair is not None:
            pairs[name] = pair
        elif report.kind == "modules_to_save":
            whole.add(module_of(name))
        progress.advance(model.info(name).nbytes)
    progress.finish()
    biases = _lora_biases(model, base, reports, pairs, whole)
    # A module kept whole (a changed bias beside a decomposed weight) takes its weight too.
    for name in [n for n in pairs if pairs[n].module in whole]:
        del pairs[name]
        report = next(r for r in reports if r.name == name)
        report.kind, report.rank, report.energy, report.relative_error = "modules_to_save", 0, 1, 0
    if not pairs and not whole:
        raise PlanError(
            f"{model.source}: every tensor equals the base's ({base.source}); nothing to extract"
        )
    saved = [n for n in names if module_of(n) in whole and is_float(model.info(n).dtype)]
    factors = _factor_tensors(pairs)
    factors.update(biases)
    tensors = [TensorInfo(n, tuple(t.shape), torch.float32) for n, t in factors.items()]
    tensors += [
        TensorInfo(PEFT_PREFIX + n, model.info(n).shape, model.info(n).dtype) for n in saved
    ]
    ranks = {pair.module: pair.a.shape[0] for pair in pairs.values()}
    config = lora_config(options.rank, ranks, sorted(whole), base_reference or base.source)
    config["lora_bias"] = bool(biases)
    files = {
        REPORT_FILE: json.dumps([asdict(r) for r in reports], indent=1) + "\n",
        "README.md": _card(base_reference or base.source, model.source, options),
    }

    def produce(info: TensorInfo):
        if info.name in factors:
            return [factors[info.name]]
        return _kept_chunks(model, info.name.removeprefix(PEFT_PREFIX), options.chunk_bytes)

    write_adapter(out, config, tensors, produce, files, options.overwrite)
    return reports


def _lora_biases(
    model: Checkpoint,
    base: Checkpoint,
    reports: list[TensorReport],
    pairs: dict[str, _Pair],
    whole: set[str],
) -> dict[str, torch.Tensor]:
    """Changed biases of decomposed layers as PEFT's ``lora_B.bias`` (``lora_bias``: merged as
    ``bias + scale·lora_B.bias``, scale 1 here), when every decomposed layer has a bias in
    the base (PEFT cannot merge ``lora_bias`` into a layer without one). Then those modules
    are no longer kept whole; otherwise they stay whole (weight and bias)."""
    modules = {pair.module: pair for pair in pairs.values()}
    changed = [
        r for r in reports
        if r.kind == "modules_to_save" and r.name.endswith(".bias") and module_of(r.name) in modules
    ]  # fmt: skip
    base_names = set(base.tensor_names())
    if not changed or any(f"{m}.bias" not in base_names for m in modules):
        return {}
    if any(pair.embedding for pair in modules.values()):
        return {}
    biases = {}
    for module in modules:
        name = f"{module}.bias"
        report = next((r for r in reports if r.name == name), None)
        delta = model.read(name).float() - base.read(name).float()
        biases[f"{PEFT_PREFIX}{module}.lora_B.bias"] = delta.contiguous()
        if report is not None and report.kind == "modules_to_save":
            report.kind = "lora_bias"
            whole.discard(module)
    return biases


def _check_inputs(model: Checkpoint, base: Checkpoint) -> list[str]:
    """The model's tensor names, once every one is known to exist in the base, same shape."""
    base_names = set(base.tensor_names())
    names = model.tensor_names()
    for name in names:
        if name not in base_names:
            raise CheckpointError(
                f"{model.source}: tensor {name!r} is absent from the base {base.source}; "
                "an adapter can only change tensors the base has"
            )
        shape, base_shape = model.info(name).shape, base.info(name).shape
        if shape != base_shape:
            raise CheckpointError(
                f"{model.source}: tensor {name!r} is {list(shape)} but {list(base_shape)} in "
                f"the base {base.source}; is it a fine-tune of this base?"
            )
    return names


def _extract_tensor(
    model: Checkpoint, base: Checkpoint, name: str, options: ExtractOptions
) -> tuple[TensorReport, _Pair | None]:
    info = model.info(name)
    report = TensorReport(name, list(info.shape), "unchanged")
    if not is_float(info.dtype):
        return report, None
    device = torch.device(options.device)
    delta = model.read(name).to(device, torch.float32) - base.read(name).to(device, torch.float32)
    if not bool(delta.any()):
        return report, None
    module = module_of(name)
    embedding = bool(EMBEDDING_MODULE.search(module))
    if delta.dim() != 2 or not name.endswith(".weight") or (embedding and not options.embeddings):
        report.kind = "modules_to_save"
        return report, None
    factors = truncated_factors(delta.T if embedding else delta, options.rank, options.sv_epsilon)
    if factors is None:
        report.kind, report.energy, report.relative_error = "dropped", 0.0, 1.0
        return report, None
    b, a, energy = factors
    report.kind = "embedding" if embedding else "lora"
    report.rank = a.shape[0]
    report.energy = energy
    report.relative_error = math.sqrt(max(0.0, 1.0 - energy))
    return report, _Pair(module, embedding, a.cpu().contiguous(), b.cpu().contiguous())


def _factor_tensors(pairs: dict[str, _Pair]) -> dict[str, torch.Tensor]:
    """Each pair's ``A`` and ``B`` under the names PEFT saves them with."""
    tensors = {}
    for pair in pairs.values():
        a_name, b_name = adapter_tensor_names(pair.module, pair.embedding)
        tensors[a_name], tensors[b_name] = pair.a, pair.b
    return tensors


def _kept_chunks(model: Checkpoint, name: str, chunk_bytes: int):
    """Tensor ``name`` of ``model`` in row chunks of about ``chunk_bytes``."""
    info = model.info(name)
    rows = info.shape[0] if info.shape else 0
    if rows == 0:
        yield model.read(name)
        return
    step = max(1, chunk_bytes // max(1, info.nbytes // rows))
    for start in range(0, rows, step):
        yield model.read(name, (start, min(rows, start + step)))


def _card(base: str, model: str, options: ExtractOptions) -> str:
    settings: dict[str, Any] = {"rank": options.rank, "sv_epsilon": options.sv_epsilon}
    settings["embeddings"] = options.embeddings
    return (
        f"---\nbase_model: {base}\nlibrary_name: peft\ntags:\n- merge-cli\n- lora\n---\n\n"
        f"# LoRA adapter extracted with merge-cli\n\nThe truncated SVD of `{model}` − `{base}` "
        f"per weight matrix ({json.dumps(settings)}); per-tensor retained energy in "
        f"`{REPORT_FILE}`.\n"
    )


# -- the recipe form: an ``extract`` section ------------------------------------------------


def plan_extraction(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> dict[str, Any]:
    """What an ``extract`` section will do, from headers (checks the model fits the base)."""
    spec = recipe.extract
    assert spec is not None
    model, base = checkpoints[spec.model], checkpoints[spec.base]
    names = _check_inputs(model, base)
    matrices = [n for n in names if len(model.info(n).shape) == 2 and is_float(model.info(n).dtype)]
    return {
        "output": "adapter",
        "note": f"extract-lora: {spec.model} − {spec.base}, rank ≤ {spec.rank} per matrix "
        f"({len(matrices)} matrices of {len(names)} tensors; unchanged ones are skipped)",
        "matrices": len(matrices),
        "input_bytes": sum(model.info(n).nbytes + base.info(n).nbytes for n in names),
    }


def extract_recipe(
    recipe: Recipe, checkpoints: dict[str, Checkpoint], options: RunOptions
) -> tuple[Path, dict[str, Any], list[TensorReport]]:
    """Run an ``extract`` section into ``save.path``; the output, a summary, the report."""
    spec = recipe.extract
    assert spec is not None and recipe.save is not None
    out = Path(recipe.save.path)
    extract_options = ExtractOptions(
        rank=spec.rank,
        sv_epsilon=spec.sv_epsilon,
        embeddings=spec.embeddings,
        device=options.device,
        overwrite=options.overwrite,
        chunk_bytes=options.chunk_bytes,
        progress=options.progress,
    )
    model, base = checkpoints[spec.model], checkpoints[spec.base]
    reports = extract_lora(model, base, out, extract_options, recipe.models[spec.base].path)
    written = (out / ADAPTER_WEIGHTS).stat().st_size
    planned = plan_extraction(recipe, checkpoints)
    summary = {
        **planned,
        "bytes_read": planned["input_bytes"],
        "tensors": sum(r.kind not in ("unchanged", "dropped") for r in reports),
        "bytes_written": written,
        "shards": [{"file": ADAPTER_WEIGHTS, "tensors": len(reports), "bytes": written}],
        "report_file": str(out / REPORT_FILE),
        "lowest_retained_energy": min(
            (r.energy for r in reports if r.kind in ("lora", "embedding")), default=None
        ),
    }
    return out, summary, reports
