"""Tiny Llama bases and real PEFT LoRA adapters of them, built in a test's directory.

The base is a transformers ``LlamaForCausalLM`` from a small ``LlamaConfig``; adapters are
made by PEFT itself (``get_peft_model`` + ``save_pretrained``) with every LoRA weight drawn
at random (PEFT initialises ``B`` to zero, which would make an adapter do nothing), so the
references (``merge_and_unload``, ``add_weighted_adapter``) are PEFT's own numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CONFIG: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_base(directory: Path, seed: int = 0, config: dict[str, Any] | None = None) -> Path:
    """Save a seeded float32 tiny Llama as a Hugging Face directory (safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**(config or CONFIG))).float().eval()
    model.save_pretrained(directory)
    return directory


def load_base(directory: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def build_adapter(base: Path, directory: Path, seed: int, **lora: Any) -> Path:
    """A PEFT LoRA adapter of ``base`` with random non-zero weights; ``lora``: LoraConfig."""
    from peft import LoraConfig, get_peft_model

    settings = {"r": 4, "lora_alpha": 8, "target_modules": ATTENTION, **lora}
    model = get_peft_model(load_base(base), LoraConfig(**settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.2 * torch.rand(parameter.shape, generator=generator))
            elif "lora_" in name or "modules_to_save" in name:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(0.1 * noise)
    model.save_pretrained(directory)
    return directory


def merged_and_unloaded(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's reference: the base with the adapter merged (``merge_and_unload``)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base), adapter).merge_and_unload()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
