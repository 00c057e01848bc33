"""LoRA adapters (PEFT's layout) applied on read: a lazy view ``W + scale·B·A`` of a base.

A model entry ``{path: BASE, lora: ADAPTER}`` opens as an :class:`AdapterCheckpoint`: the
base checkpoint seen through the adapter. Every tensor the adapter targets is computed when
it is read (row chunks included), the others are the base's, unchanged, so a merge of several
adapters over one base streams exactly as a merge of full models and never materialises one.

The adapter is read the way PEFT writes it (``save_pretrained``): ``adapter_config.json``
and ``adapter_model.safetensors``, whose tensors are named ``base_model.model.<module>.`` +
``lora_A.weight`` / ``lora_B.weight`` (linear layers), ``lora_embedding_A`` /
``lora_embedding_B`` (embeddings), ``lora_magnitude_vector`` (DoRA), ``lora_B.bias``
(``lora_bias``), ``base_layer.weight`` (an embedding saved with the adapter) or
``<module>.weight`` (``modules_to_save``: the module's trained copy replaces the base's).
The merged weight is what ``PeftModel.merge_and_unload()`` computes:

- LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
  ``W + s·B·A`` with ``s = lora_alpha / r``, per module ``r`` and ``lora_alpha`` from
  ``rank_pattern`` / ``alpha_pattern``; transposed for embeddings (``A`` is
  ``r × num_embeddings``) and for ``fan_in_fan_out`` layers (weights stored ``in × out``).
- rsLoRA (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with
  LoRA"): ``s = lora_alpha / sqrt(r)`` when ``use_rslora``.
- DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), linear layers:
  ``m / ||W + s·B·A||_row · (W + s·B·A)``, the norm taken per output unit (PEFT's
  ``DoraLinearVariant``). DoRA on embeddings or convolutions is refused.

Everything here reads headers and the small JSON config only; a wrong adapter (another base's
shapes, a module the base lacks, a missing config) is refused when it is opened, before any
tensor data is read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_cli.errors import CheckpointError
from merge_cli.io.checkpoint import Checkpoint, SafetensorsCheckpoint, TensorInfo, missing_tensor
from merge_cli.io.quantized import dequantizing
from merge_cli.io.resolve import HUB_PREFIX, download_hub_repo, open_checkpoint
from merge_cli.io.writer import ShardedWriter

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: PEFT's prefix of every saved tensor name (``PeftModel.base_model.model``).
PEFT_PREFIX = "base_model.model."
#: Adapter-config keys of LoRA variants whose merged weight is not ``W + s·B·A``: refused
#: when set (PEFT's names).
UNSUPPORTED_SETTINGS = (
    "layer_replication",
    "target_parameters",
    "alora_invocation_tokens",
    "trainable_token_indices",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "velora_config",
)
_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lora_B.bias": "bias",
    ".base_layer.weight": "base",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: ``target`` (a base tensor name) becomes ``W + scale·B·A``.

    ``transposed``: the delta is ``(B·A)ᵀ`` (embeddings, ``fan_in_fan_out`` layers).
    ``magnitude``: DoRA's magnitude vector; ``bias``: ``lora_B.bias`` (added, scaled, to the
    target's ``bias`` tensor, which :attr:`LoraAdapter.bias_of` names)."""

    module: str
    target: str
    a: str
    b: str
    scale: float
    transposed: bool
    magnitude: str | None = None
    bias: str | None = None


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter, headers read: its modules by target tensor, and the base tensors
    it replaces (``modules_to_save`` and saved embedding layers) by name."""

    source: str
    directory: Path
    config: dict[str, Any]
    weights: SafetensorsCheckpoint
    modules: dict[str, LoraModule]
    replaced: dict[str, str]
    bias_of: dict[str, LoraModule]


def open_adapter(reference: str, base_dir: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The directory of the adapter ``reference`` (a local PEFT directory or
    ``hf://org/name@rev``) and its ``adapter_config.json``."""
    if reference.startswith(HUB_PREFIX):
        directory = download_hub_repo(reference)
    else:
        directory = Path(reference).expanduser()
        if not directory.is_absolute() and base_dir is not None:
            directory = base_dir / directory
        if not directory.exists():
            raise CheckpointError(f"{reference}: no such adapter directory ({directory})")
        if directory.is_file():
            raise CheckpointError(
                f"{reference}: expected a PEFT adapter directory (adapter_config.json and "
                f"{ADAPTER_WEIGHTS}), got a file"
            )
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        raise CheckpointError(
            f"{reference}: not a PEFT adapter: {ADAPTER_CONFIG} is missing in {directory}"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_path}: not a valid adapter config ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: not a valid adapter config (not a JSON object)")
    return directory, config


def read_adapter(reference: str, base: Checkpoint, base_dir: Path | None = None) -> LoraAdapter:
    """Open the adapter ``reference`` for ``base`` (headers only) and check that it fits:
    every adapted module exists in the base with the shapes the adapter implies."""
    directory, config = open_adapter(reference, base_dir)
    _check_config(reference, config)
    weights_path = directory / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        other = (
            " (adapter_model.bin is not read: convert it to safetensors)"
            * (directory / "adapter_model.bin").is_file()
        )
        raise CheckpointError(f"{reference}: {ADAPTER_WEIGHTS} is missing in {directory}{other}")
    weights = SafetensorsCheckpoint([weights_path], reference, directory)
    parts, replaced = _group_tensors(reference, weights.tensor_names())
    modules: dict[str, LoraModule] = {}
    bias_of: dict[str, LoraModule] = {}
    base_names = set(base.tensor_names())
    absent = []
    for module, found in parts.items():
        target = f"{module}.weight"
        if target not in base_names and target not in replaced:
            absent.append(module)
            continue
        lora = _module(reference, config, module, found, weights)
        modules[target] = lora
        if lora.bias is not None:
            bias_of[f"{module}.bias"] = lora
    absent += [name.removesuffix(".weight") for name in replaced if name not in base_names]
    if absent:
        shown = ", ".join(sorted(absent)[:3]) + (" ..." if len(absent) > 3 else "")
        raise CheckpointError(
            f"{reference}: adapts modules absent from the base {base.source}: {shown} "
            f"({len(absent)} of {len(parts) + len(replaced)}); is it an adapter of this base?"
        )
    if not modules:
        raise CheckpointError(f"{reference}: holds no LoRA weights (lora_A / lora_B)")
    _check_target_modules(reference, config, base_names)
    adapter = LoraAdapter(reference, directory, config, weights, modules, replaced, bias_of)
    for lora in modules.values():
        _check_shapes(adapter, base, lora)
    return adapter


def _check_config(reference: str, config: dict[str, Any]) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(
            f"{reference}: {ADAPTER_CONFIG}: peft_type is {peft_type!r}; only LoRA adapters "
            "(peft_type LORA) can be applied"
        )
    for key in UNSUPPORTED_SETTINGS:
        if config.get(key):
            raise CheckpointError(
                f"{reference}: {ADAPTER_CONFIG}: {key} is set; this LoRA variant is not "
                "supported (its merged weight is not W + scale·B·A)"
            )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(
                f"{reference}: {ADAPTER_CONFIG}: {key} must be a positive number, got {value!r}"
            )


def _group_tensors(
    reference: str, names: list[str]
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Adapter tensors by module (``{"A": name, "B": name, ...}``) and the replaced base
    tensors (``modules_to_save``, saved embedding layers): base name -> adapter name."""
    parts: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    for name in names:
        if not name.startswith(PEFT_PREFIX):
            raise CheckpointError(
                f"{reference}: tensor {name!r} is not named as PEFT saves adapters "
                f"({PEFT_PREFIX}...)"
            )
        path = name.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in _SUFFIXES if path.endswith(s)), None)
        if suffix is None:
            if ".lora_" in path or "trainable_tokens" in path:
                raise CheckpointError(f"{reference}: tensor {name!r}: unsupported adapter weight")
            replaced[path] = name  # modules_to_save: the module's trained copy
            continue
        module = path.removesuffix(suffix)
        if _SUFFIXES[suffix] == "base":
            replaced[f"{module}.weight"] = name
        else:
            parts.setdefault(module, {})[_SUFFIXES[suffix]] = name
    for module, found in parts.items():
        if "A" not in found or "B" not in found:
            raise CheckpointError(f"{reference}: module {module!r} lacks lora_A or lora_B")
    return parts, replaced


def _pattern_value(patterns: Any, module: str, default: float) -> float:
    """PEFT's ``get_pattern_key``: the first pattern matching the module name's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module(
    reference: str,
    config: dict[str, Any],
    module: str,
    found: dict[str, str],
    weights: SafetensorsCheckpoint,
) -> LoraModule:
    rank = _pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    stored_rank = weights.info(found["A"]).shape[0]
    if stored_rank != rank:
        raise CheckpointError(
            f"{reference}: module {module!r}: lora_A has rank {stored_rank}, "
            f"{ADAPTER_CONFIG} says r = {rank}"
        )
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    embedding = found["A"].endswith("lora_embedding_A")
    if len(weights.info(found["A"]).shape) != 2:
        raise CheckpointError(
            f"{reference}: module {module!r}: LoRA on convolutions is not supported "
            "(only linear and embedding layers)"
        )
    if "magnitude" in found and embedding:
        raise CheckpointError(
            f"{reference}: module {module!r}: DoRA on embeddings is not supported "
            "(only on linear layers)"
        )
    return LoraModule(
        module=module,
        target=f"{module}.weight",
        a=found["A"],
        b=found["B"],
        scale=float(scale),
        transposed=embedding or bool(config.get("fan_in_fan_out")),
        magnitude=found.get("magnitude"),
        bias=found.get("bias"),
    )


def _check_target_modules(reference: str, config: dict[str, Any], base_names: set[str]) -> None:
    """As PEFT: a ``target_modules`` list must match some module of the base."""
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets:
        return
    modules = {name.rsplit(".", 1)[0] for name in base_names if "." in name}
    if not any(
        module == target or module.endswith(f".{target}")
        for module in modules
        for target in targets
    ):
        raise CheckpointError(
            f"{reference}: {ADAPTER_CONFIG}: target_modules {targets} match no module of the base"
        )


def _check_shapes(adapter: LoraAdapter, base: Checkpoint, lora: LoraModule) -> None:
    a = adapter.weights.info(lora.a).shape
    b = adapter.weights.info(lora.b).shape
    target = _target_info(adapter, base, lora.target)
    delta = (b[0], a[1]) if not lora.transposed else (a[1], b[0])
    problem = None
    if len(b) != 2 or b[1] != a[0]:
        problem = f"lora_B {list(b)} does not fit lora_A {list(a)}"
    elif target.shape != delta:
        problem = f"B·A is {list(delta)} but the base's {lora.target!r} is {list(target.shape)}"
    elif lora.magnitude is not None:
        m = adapter.weights.info(lora.magnitude).shape
        rows = delta[1] if lora.transposed else delta[0]
        if m != (rows,):
            problem = f"the DoRA magnitude {list(m)} does not fit {list(delta)}"
    if problem is None and lora.bias is not None:
        bias_name = f"{lora.module}.bias"
        if bias_name not in base.tensor_names():
            problem = "lora_bias is set but the base layer has no bias"
        elif base.info(bias_name).shape != adapter.weights.info(lora.bias).shape:
            problem = f"lora_B.bias does not fit the base's {bias_name!r}"
    if problem is not None:
        raise CheckpointError(
            f"{adapter.source}: module {lora.module!r}: {problem}; "
            f"is it an adapter of {base.source}?"
        )


def _target_info(adapter: LoraAdapter, base: Checkpoint, name: str) -> TensorInfo:
    if name in adapter.replaced:
        return adapter.weights.info(adapter.replaced[name])
    return base.info(name)


def lora_delta(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    transposed: bool,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``scale · B·A`` (``(B·A)ᵀ`` when ``transposed``), or only its rows ``[start, stop)``,
    in float32 as PEFT's ``get_delta_weight`` computes it."""
    a, b = a.float(), b.float()
    if not transposed:
        if rows is not None:
            b = b[rows[0] : rows[1]]
        return (b @ a) * scale
    if rows is not None:
        a = a[:, rows[0] : rows[1]]
    return (b @ a).T * scale


class AdapterCheckpoint:
    """``base`` with ``adapter`` applied: a Checkpoint whose reads of adapted tensors return
    the merged weight in float32, computed from the rows read (other tensors: the base's)."""

    def __init__(self, base: Checkpoint, adapter: LoraAdapter):
        self.base = base
        self.adapter = adapter
        self.source = f"{base.source} + {adapter.source}"
        self.directory = base.directory
        self._names = set(base.tensor_names())

    def tensor_names(self) -> list[str]:
        return self.base.tensor_names()

    def info(self, name: str) -> TensorInfo:
        info = self.base.info(name)
        replaced = self.adapter.replaced.get(name)
        if replaced is None:
            return info
        return TensorInfo(name, self.adapter.weights.info(replaced).shape, info.dtype)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name not in self._names:
            raise missing_tensor(self.source, name)
        lora = self.adapter.modules.get(name)
        if lora is not None:
            return self._adapted(lora, rows)
        lora = self.adapter.bias_of.get(name)
        if lora is not None:
            assert lora.bias is not None
            bias = self._weight(name, rows).float()
            extra = self.adapter.weights.read(lora.bias, rows).float()
            return bias + extra * lora.scale
        return self._weight(name, rows)

    def _weight(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        replaced = self.adapter.replaced.get(name)
        if replaced is None:
            return self.base.read(name, rows)
        return self.adapter.weights.read(replaced, rows).to(self.base.info(name).dtype)

    def _adapted(self, lora: LoraModule, rows: tuple[int, int] | None) -> torch.Tensor:
        weights = self.adapter.weights
        a, b = weights.read(lora.a), weights.read(lora.b)
        if lora.magnitude is not None and lora.transposed and rows is not None:
            # DoRA's norms run along the stored rows' axis here: compute whole, keep the rows.
            return self._adapted(lora, None)[rows[0] : rows[1]]
        weight = self._weight(lora.target, rows).float()
        merged = weight + lora_delta(a, b, lora.scale, lora.transposed, rows)
        if lora.magnitude is None:
            return merged
        magnitude = weights.read(lora.magnitude).float()
        if lora.transposed:  # fan_in_fan_out: output units are the stored columns
            return merged * (magnitude / torch.linalg.norm(merged, dim=0))
        if rows is not None:
            magnitude = magnitude[rows[0] : rows[1]]
        return merged * (magnitude / torch.linalg.norm(merged, dim=1)).view(-1, 1)


def open_model(path: str, lora: str | None = None, base_dir: Path | None = None) -> Checkpoint:
    """A recipe model: the checkpoint at ``path`` (dequantized on read when its config.json
    says it is quantized), seen through the adapter ``lora`` if any."""
    checkpoint = dequantizing(open_checkpoint(path, base_dir))
    if lora is None:
        return checkpoint
    return AdapterCheckpoint(checkpoint, read_adapter(lora, checkpoint, base_dir))


def adapter_tensor_names(module: str, embedding: bool) -> tuple[str, str]:
    """The names PEFT saves a module's ``A`` and ``B`` under."""
    if embedding:
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def lora_config(
    rank: int,
    ranks: dict[str, int],
    modules_to_save: list[str],
    base_model: str | None,
    alpha: float | None = None,
    alphas: dict[str, float] | None = None,
) -> dict[str, Any]:
    """An ``adapter_config.json`` PEFT's ``LoraConfig`` reads: ``ranks`` (module -> r) become
    ``target_modules`` (full module names) and the ``rank_pattern`` entries that differ from
    ``rank``; without ``alpha``, every module's ``lora_alpha`` is its rank (scale 1)."""
    alphas = alphas if alphas is not None else ({m: float(r) for m, r in ranks.items()})
    alpha = float(rank) if alpha is None else alpha
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: r for m, r in sorted(ranks.items()) if r != rank},
        "alpha_pattern": {m: a for m, a in sorted(alphas.items()) if a != alpha},
        "modules_to_save": sorted(modules_to_save) or None,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "inference_mode": True,
        "init_lora_weights": True,
    }


def write_adapter(
    target: Path,
    config: dict[str, Any],
    tensors: list[TensorInfo],
    produce: Callable[[TensorInfo], Iterable[torch.Tensor]],
    files: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a PEFT adapter directory: ``adapter_model.safetensors`` holding ``tensors`` (the
    chunks ``produce`` yields for each, in row order), ``adapter_config.json`` and ``files``.
    Staged and renamed into place like every output: a failure leaves nothing at ``target``."""
    writer = ShardedWriter(target, [tensors], [ADAPTER_WEIGHTS], overwrite=overwrite)
    with writer:
        for info in tensors:
            for chunk in produce(info):
                writer.write(info.name, chunk.to(info.dtype).contiguous())
        writer.write_text(ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
        for name, text in (files or {}).items():
            writer.write_text(name, text)
        return writer.finish()
