"""Tiny quantized checkpoints with real tensor names, for the quantized-input tests.

Each builder makes a model with its transformers config class, saves it with
``save_pretrained`` (the on-disk tensor names: DeepSeek-V3 per-expert weights, gpt-oss
stacked experts) and then stores chosen weights quantized, with the config.json
``quantization_config`` the real releases carry. The reference dequantizers here are
written independently of merge_cli.io.quantized (plain loops over blocks), so the tests
compare against the formats' definitions, not against the code under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BLOCK = (128, 128)
E4M3_MAX = 448.0
FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def deepseek_config():
    from transformers import DeepseekV3Config

    # hidden 256 and q_lora 128 give whole 128x128 blocks; kv_a_proj_with_mqa (96 rows) and
    # kv_b_proj (64 columns) give partial ones.
    return DeepseekV3Config(
        vocab_size=64,
        hidden_size=256,
        intermediate_size=384,
        moe_intermediate_size=128,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_rope_head_dim=32,
        qk_nope_head_dim=32,
        v_head_dim=32,
    )


def save_model(model_class, config, path: Path, seed: int) -> dict[str, torch.Tensor]:
    """A randomly initialised model saved with save_pretrained; its state as saved."""
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():  # larger weights than the init's, so merges differ visibly
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(path)
    return load_file(path / "model.safetensors")


def is_deepseek_fp8(name: str, tensor: torch.Tensor) -> bool:
    """DeepSeek-V3's FP8 weights: every linear projection in the layers (not the router)."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight") and tensor.dim() == 2


def quantize_blocks(weight: torch.Tensor, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 with one scale_inv per block, block by block (DeepSeek-V3 layout)."""
    rows, cols = weight.shape
    scale = torch.empty(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    data = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = weight[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            s = tile.abs().max().item() / E4M3_MAX or 1.0
            scale[i, j] = s
            data[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (
                tile.float() / s
            ).to(torch.float8_e4m3fn)
    return data, scale


def dequantize_blocks(data: torch.Tensor, scale: torch.Tensor, block=BLOCK) -> torch.Tensor:
    out = data.float().clone()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] *= scale[i, j]
    return out


FP8_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "weight_block_size": [128, 128],
    "activation_scheme": "dynamic",
}


def write_config(path: Path, quantization: dict | None) -> None:
    config = json.loads((path / "config.json").read_text())
    if quantization is None:
        config.pop("quantization_config", None)
    else:
        config["quantization_config"] = quantization
    (path / "config.json").write_text(json.dumps(config, indent=2))


def make_deepseek_fp8(path: Path, seed: int) -> dict[str, torch.Tensor]:
    """A DeepSeek-V3-shaped FP8 checkpoint at ``path``; returns its dequantized state."""
    from transformers import DeepseekV3ForCausalLM

    state = save_model(DeepseekV3ForCausalLM, deepseek_config(), path, seed)
    stored, dequantized = {}, {}
    for name, tensor in state.items():
        if is_deepseek_fp8(name, tensor):
            data, scale = quantize_blocks(tensor)
            stored[name], stored[name + "_scale_inv"] = data, scale
            dequantized[name] = dequantize_blocks(data, scale)
        else:
            stored[name] = tensor
            dequantized[name] = tensor.float()
    save_file(stored, path / "model.safetensors", metadata={"format": "pt"})
    write_config(path, FP8_CONFIG)
    return dequantized


# -- MXFP4 (gpt-oss) ------------------------------------------------------------------------


def gpt_oss_config():
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
    )


def quantize_mxfp4(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` (..., K) as MXFP4: uint8 blocks (..., K/32, 16), E8M0 scales (..., K/32)."""
    groups = values.float().reshape(*values.shape[:-1], -1, 32)
    amax = groups.abs().amax(-1).clamp_min(2.0**-100)
    exponent = torch.floor(torch.log2(amax)) - 2  # E2M1's largest value is 1.5 * 2**2
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    table = torch.tensor(FP4)
    codes = (scaled.unsqueeze(-1) - table).abs().argmin(-1).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, (exponent + 127).to(torch.uint8)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    out = torch.empty(*blocks.shape[:-1], 32)
    flat_blocks, flat_out = blocks.reshape(-1, 16), out.reshape(-1, 32)
    flat_scales = scales.reshape(-1)
    for g in range(flat_blocks.shape[0]):
        factor = 2.0 ** (int(flat_scales[g]) - 127)
        for k in range(16):
            byte = int(flat_blocks[g, k])
            flat_out[g, 2 * k] = FP4[byte & 15] * factor
            flat_out[g, 2 * k + 1] = FP4[byte >> 4] * factor
    return out.reshape(*blocks.shape[:-2], -1)


MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "lm_head"],
}


def make_gpt_oss_mxfp4(path: Path, seed: int) -> dict[str, torch.Tensor]:
    """A gpt-oss-shaped checkpoint with MXFP4 experts; returns its dequantized state."""
    from transformers import GptOssForCausalLM

    state = save_model(GptOssForCausalLM, gpt_oss_config(), path, seed)
    stored, dequantized = {}, {}
    for name, tensor in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            # stored out-features-major: (experts, out, in) packed along in
            blocks, scales = quantize_mxfp4(tensor.transpose(1, 2))
            stored[name + "_blocks"], stored[name + "_scales"] = blocks, scales
            dequantized[name] = dequantize_mxfp4(blocks, scales).transpose(1, 2)
        else:
            stored[name] = tensor
            dequantized[name] = tensor.float()
    save_file(stored, path / "model.safetensors", metadata={"format": "pt"})
    write_config(path, MXFP4_CONFIG)
    return dequantized


# -- compressed-tensors FP8 (per-channel) ---------------------------------------------------


def qwen3_moe_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
    )


COMPRESSED_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 8,
                "type": "float",
                "strategy": "channel",
                "symmetric": True,
                "dynamic": False,
            },
            "input_activations": {
                "num_bits": 8,
                "type": "float",
                "strategy": "token",
                "symmetric": True,
                "dynamic": True,
            },
        }
    },
    "ignore": ["lm_head", "re:.*mlp.gate$"],
}


def make_qwen3_moe_compressed(path: Path, seed: int) -> dict[str, torch.Tensor]:
    """A Qwen3-MoE-shaped compressed-tensors FP8 (per-channel) checkpoint, as llm-compressor's
    FP8_DYNAMIC scheme writes it (``weight`` float8, ``weight_scale`` rows x 1)."""
    from transformers import Qwen3MoeForCausalLM

    state = save_model(Qwen3MoeForCausalLM, qwen3_moe_config(), path, seed)
    stored, dequantized = {}, {}
    for name, tensor in state.items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            scale = tensor.abs().amax(1, keepdim=True) / E4M3_MAX
            data = (tensor / scale).to(torch.float8_e4m3fn)
            stored[name], stored[name.removesuffix("weight") + "weight_scale"] = data, scale
            dequantized[name] = data.float() * scale
        else:
            stored[name] = tensor
            dequantized[name] = tensor.float()
    save_file(stored, path / "model.safetensors", metadata={"format": "pt"})
    write_config(path, COMPRESSED_CONFIG)
    return dequantized


def linear(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict:
    total = sum(weights)
    return {
        name: sum(w / total * s[name].float() for w, s in zip(weights, states, strict=True))
        for name in states[0]
    }
