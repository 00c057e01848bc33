"""Build small deterministic Llama-architecture checkpoints for the demo and the tests.

Writes ``base`` and two fine-tune-like variants (``math``, ``code``: the base plus seeded
task-specific deltas) as Hugging Face directories: sharded bf16 safetensors with an index,
config.json, generation_config.json and a tokenizer file.

    python scripts/make_example_models.py examples/models
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def llama_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """A Llama state dict with the real tensor names, from a seeded transformers model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def variant(base: dict[str, torch.Tensor], seed: int, scale: float) -> dict[str, torch.Tensor]:
    """The base plus a seeded, task-like delta on every floating tensor."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in base.items():
        delta = (
            torch.randn(tensor.shape, generator=generator)
            * scale
            * tensor.float().std().clamp(min=1e-3)
        )
        out[name] = tensor + delta.to(tensor.dtype)
    return out


def save_hf_directory(
    state: dict[str, torch.Tensor],
    directory: Path,
    config: dict,
    shards: int = 2,
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Save ``state`` as a Hugging Face checkpoint directory with ``shards`` shards."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(state)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    total = 0
    for i in range(shards):
        part = {
            n: state[n].to(dtype).contiguous() for n in names[i * per_shard : (i + 1) * per_shard]
        }
        if not part:
            continue
        file_name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update({n: file_name for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2)
    )
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to create the models in")
    args = parser.parse_args()
    base = llama_state_dict(CONFIG, seed=0)
    save_hf_directory(base, args.out / "base", CONFIG)
    save_hf_directory(variant(base, seed=1, scale=0.05), args.out / "math", CONFIG)
    save_hf_directory(variant(base, seed=2, scale=0.05), args.out / "code", CONFIG)
    print(f"wrote base, math, code under {args.out}")


if __name__ == "__main__":
    main()
