"""Build two PEFT LoRA adapters of the example base for the LoRA recipes (recipes/lora).

Made with PEFT itself (``get_peft_model`` + ``save_pretrained``); PEFT starts ``B`` at zero,
so every LoRA weight is drawn at random to give each adapter an effect, as a fine-tune would.

    python scripts/make_example_models.py examples/models
    python scripts/make_example_adapters.py examples/models/base examples/adapters
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

#: name -> LoraConfig arguments.
ADAPTERS = {
    "math": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj"]},
    "code": {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    },
}


def build_adapter(base: Path, out: Path, seed: int, settings: dict) -> Path:
    """A PEFT LoRA adapter of the checkpoint at ``base``, with random non-zero weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(**settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, help="the example base model")
    parser.add_argument("out", type=Path, help="directory to create the adapters in")
    args = parser.parse_args()
    for seed, (name, settings) in enumerate(ADAPTERS.items(), start=1):
        build_adapter(args.base, args.out / name, seed, settings)
    print(f"wrote {', '.join(ADAPTERS)} under {args.out}")


if __name__ == "__main__":
    main()
