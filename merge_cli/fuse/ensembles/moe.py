"""Mixture-of-experts assembly: a Mixtral checkpoint from a dense base and N dense experts.

Every layer of the output keeps the base model's attention and norms (and the base's
embeddings, final norm and lm_head); its MLP becomes a sparse MoE block whose expert ``e`` is
expert model ``e``'s MLP of that layer (``gate_proj``/``up_proj``/``down_proj`` become
Mixtral's ``w1``/``w3``/``w2``), and a router ``gate.weight`` of shape
``[num_experts, hidden_size]`` picks ``num_experts_per_tok`` experts per token. This is the
"clown-car" MoE of mergekit-moe (Goddard et al. 2024, "Arcee's MergeKit") in the Mixtral
layout (Jiang et al. 2024, "Mixtral of experts"); from a single dense model it is sparse
upcycling (Komatsuzaki et al. 2023).

Router initialisation (``gate_mode``, mergekit-moe's names where they exist):

* ``hidden``: for each expert, the base model's hidden states (the residual stream entering
  each layer) at the last token of each of the expert's ``positive_prompts``, averaged over
  the prompts, minus the same for its ``negative_prompts``, normalised to unit length per
  layer. A token is routed to the expert whose prompts it resembles.
* ``hidden_avg``: the same with the mean over all tokens of a prompt.
* ``random``: normal with the base config's ``initializer_range`` (0.02), seeded by
  ``fuse.seed`` — for an MoE that will be fine-tuned.
* ``uniform``: all zeros: every expert is equally likely and the top-k choice is a tie.

Prompts are text (tokenised with the base model's tokenizer, BOS first, as mergekit does) or
lists of token ids (for models without a tokenizer). The method streams: tensors are copied
chunk by chunk from the inputs; only the routers — ``layers x experts x hidden`` floats — are
computed, before the stream, as a lazy derived input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_cli.engine.method import TensorMethod, copy_first
from merge_cli.engine.params import count_layers
from merge_cli.engine.plan import OutputTensor, output_dtype
from merge_cli.errors import PlanError
from merge_cli.io.checkpoint import Checkpoint, ComputedCheckpoint, TensorInfo
from merge_cli.recipe import Recipe, TaskSpec
from merge_cli.task import Task

ROUTER_SOURCE = "moe_router"
DENSE_ARCHITECTURES = ("llama", "mistral")
MLP_PATTERN = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
#: dense MLP projection -> Mixtral expert weight
EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}

Prompt = str | list[int]


class MoEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gate_mode: Literal["hidden", "hidden_avg", "random", "uniform"] = Field(
        "hidden", description="router initialisation"
    )
    num_experts_per_tok: int = Field(2, ge=1, description="experts each token is routed to")


class MoEModelParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    positive_prompts: list[Prompt] = Field(
        default_factory=list, description="text or token ids this expert should handle"
    )
    negative_prompts: list[Prompt] = Field(
        default_factory=list, description="text or token ids this expert should not handle"
    )


def router_name(layer: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


def expert_name(layer: int, expert: int, projection: str) -> str:
    return (
        f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{EXPERT_NAMES[projection]}.weight"
    )


def read_config(checkpoint: Checkpoint, role: str) -> dict[str, Any]:
    path = checkpoint.directory / "config.json" if checkpoint.directory else None
    if path is None or not path.exists():
        raise PlanError(f"moe: the {role} ({checkpoint.source}) needs a config.json")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise PlanError(f"{path}: not valid JSON ({error})") from error


def check_dense_config(config: dict[str, Any], source: str) -> None:
    model_type = config.get("model_type")
    if model_type not in DENSE_ARCHITECTURES:
        raise PlanError(
            f"moe: {source} is a {model_type!r} model; the base and experts must be dense "
            f"Llama or Mistral models ({', '.join(DENSE_ARCHITECTURES)})"
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise PlanError(f"moe: {source} has bias terms, which the Mixtral layout cannot hold")


# ---------------------------------------------------------------------------------------
# Routers: a lazy derived input, computed on first read


def router_checkpoint(
    num_layers: int, num_experts: int, hidden_size: int, compute: Callable[[], torch.Tensor]
) -> ComputedCheckpoint:
    """The routers of every layer (``compute`` gives them stacked, ``[layers, experts,
    hidden]``), computed once, when first read."""
    names = [router_name(layer) for layer in range(num_layers)]

    def select(gates: torch.Tensor, name: str, start: int, stop: int) -> torch.Tensor:
        return gates[names.index(name)][start:stop]

    infos = [TensorInfo(name, (num_experts, hidden_size), torch.float32) for name in names]
    return ComputedCheckpoint("<moe router>", infos, compute, select)


def prompt_hidden_states(
    model: torch.nn.Module, prompts: list[list[int]], average: bool
) -> torch.Tensor:
    """``[layers, hidden]``: the residual stream entering each layer, averaged over prompts."""
    states = []
    with torch.no_grad():
        for ids in prompts:
            output = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            hidden = torch.stack(output.hidden_states[:-1])[:, 0]  # [layers, tokens, hidden]
            states.append(hidden.mean(1) if average else hidden[:, -1])
    return torch.stack(states).mean(0)


def tokenize(prompts: list[Prompt], directory: Path | None, vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt: given ids as they are, text through the base's tokenizer."""
    tokenizer = None
    result = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                tokenizer = _tokenizer(directory)
            ids = tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False)
            prompt = list(ids["input_ids"])
        if not prompt or not all(0 <= i < vocab_size for i in prompt):
            raise PlanError(f"moe: prompt token ids must be in [0, {vocab_size}), got {prompt}")
        result.append(prompt)
    return result


def _tokenizer(directory: Path | None) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as error:
        raise PlanError(
            f"moe: text prompts need the base model's tokenizer ({directory}): {error}; "
            "give prompts as lists of token ids instead"
        ) from error


def hidden_gates(
    base: Checkpoint,
    config: dict[str, Any],
    prompts: list[tuple[list[Prompt], list[Prompt]]],
    average: bool,
) -> torch.Tensor:
    """``[layers, experts, hidden]`` router rows from the base model's hidden states."""
    model = Task(TaskSpec(model="transformers")).load_model(base).float()
    vocab = int(config["vocab_size"])
    rows = []
    for positive, negative in prompts:
        vector = prompt_hidden_states(model, tokenize(positive, base.directory, vocab), average)
        if negative:
            vector -= prompt_hidden_states(
                model, tokenize(negative, base.directory, vocab), average
            )
        rows.append(vector / vector.norm(dim=-1, keepdim=True).clamp_min(1e-8))
    return torch.stack(rows, dim=1)


def derived_routers(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> dict[str, Checkpoint]:
    """The router source for the plan (headers and configs only; gates computed lazily)."""
    spec = recipe.fuse
    assert spec is not None and spec.base is not None
    params = MoEParams.model_validate(
        {k: v for k, v in spec.params.items() if k in MoEParams.model_fields}
    )
    experts = spec.model_names(list(recipe.models))
    base = checkpoints[spec.base]
    config = read_config(base, "base model")
    check_dense_config(config, base.source)
    num_layers = count_layers(base.tensor_names())
    embed = base.info("model.embed_tokens.weight")
    hidden_size = embed.shape[1]
    shape = (num_layers, len(experts), hidden_size)
    prompts = []
    for name in experts:
        level = {k: v for k, v in spec.params.items() if k in MoEModelParams.model_fields}
        values = MoEModelParams.model_validate({**level, **spec.model_values(name)})
        if params.gate_mode.startswith("hidden") and not values.positive_prompts:
            raise PlanError(
                f"fuse.models.{name}.positive_prompts: gate_mode {params.gate_mode!r} needs "
                "at least one prompt per expert (text or a list of token ids)"
            )
        prompts.append((values.positive_prompts, values.negative_prompts))

    def compute() -> torch.Tensor:
        if params.gate_mode == "uniform":
            return torch.zeros(shape)
        if params.gate_mode == "random":
            generator = torch.Generator().manual_seed(spec.seed)
            scale = float(config.get("initializer_range", 0.02))
            return torch.randn(shape, generator=generator) * scale
        return hidden_gates(base, config, prompts, average=params.gate_mode == "hidden_avg")

    return {ROUTER_SOURCE: router_checkpoint(num_layers, len(experts), hidden_size, compute)}


# ---------------------------------------------------------------------------------------
# The plan


def _plan_tensors(
    checkpoints: dict[str, Checkpoint],
    model_names: list[str],
    base: str | None,
    params: MoEParams,
    save_dtype: str,
) -> tuple[list[OutputTensor], dict[str, Any], str]:
    assert base is not None
    if params.num_experts_per_tok > len(model_names):
        raise PlanError(
            f"fuse.params.num_experts_per_tok: {params.num_experts_per_tok} is more than the "
            f"{len(model_names)} expert(s)"
        )
    for name in model_names:
        check_dense_config(read_config(checkpoints[name], f"expert {name!r}"), name)
    base_names = checkpoints[base].tensor_names()
    mlp = {name: MLP_PATTERN.match(name) for name in base_names}
    layers = sorted({int(found.group(1)) for found in mlp.values() if found})
    if not layers:
        raise PlanError(f"moe: the base model {base!r} has no model.layers.N.mlp.*_proj tensors")

    def copied(out_name: str, model: str, name: str) -> OutputTensor:
        info = checkpoints[model].info(name)
        return OutputTensor(
            out_name, info.shape, output_dtype(info.dtype, save_dtype), copy_from=(model, name)
        )

    embed = checkpoints[base].info("model.embed_tokens.weight")
    hidden_size, embed_dtype = embed.shape[1], embed.dtype
    expert_tensors = {name: set(checkpoints[name].tensor_names()) for name in model_names}
    problems = []
    intermediate: set[int] = set()
    tensors = []
    emitted: set[int] = set()
    for name in base_names:
        found = mlp[name]
        if found is None:
            tensors.append(copied(name, base, name))
            continue
        layer = int(found.group(1))
        if layer in emitted:
            continue
        emitted.add(layer)
        # the router (computed in float32) is saved in the base model's dtype under "keep"
        router = copied(router_name(layer), ROUTER_SOURCE, router_name(layer))
        tensors.append(replace(router, dtype=output_dtype(embed_dtype, save_dtype)))
        for index, expert in enumerate(model_names):
            for projection in EXPERT_NAMES:
                source = f"model.layers.{layer}.mlp.{projection}.weight"
                if source not in expert_tensors[expert]:
                    problems.append(f"expert {expert!r} has no tensor {source!r}")
                    continue
                tensor = copied(expert_name(layer, index, projection), expert, source)
                # gate/up are [intermediate, hidden], down is [hidden, intermediate]
                inner, outer = tensor.shape if projection != "down_proj" else tensor.shape[::-1]
                if outer != hidden_size:
                    problems.append(
                        f"expert {expert!r}: {source} has hidden size {outer}, "
                        f"the base has {hidden_size}"
                    )
                intermediate.add(inner)
                tensors.append(tensor)
    if len(intermediate) > 1:
        problems.append(f"the experts' MLPs differ in size ({sorted(intermediate)})")
    if problems:
        raise PlanError("moe: the experts cannot be assembled:\n  " + "\n  ".join(problems[:20]))
    config_updates = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": len(model_names),
        "num_experts_per_tok": params.num_experts_per_tok,
        "intermediate_size": intermediate.pop(),
        "output_router_logits": False,
    }
    return tensors, config_updates, base


METHOD = TensorMethod(
    name="moe",
    url="https://arxiv.org/abs/2401.04088",
    family="ensemble",
    summary="Assemble a Mixtral mixture of experts from a dense Llama/Mistral base (attention, "
    "norms, embeddings) and N dense experts (one MLP each), with a hidden-state router.",
    reference="mergekit-moe (Goddard et al. 2024); Jiang et al. 2024, Mixtral of experts",
    params=MoEParams,
    model_params=MoEModelParams,
    needs_base=True,
    min_models=1,
    merge=copy_first,
    plan_tensors=_plan_tensors,
    derived_inputs=derived_routers,
)
