"""The dequantizing view: FP8 block scales, MXFP4 and compressed-tensors FP8, read by rows."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_cli.errors import CheckpointError
from merge_cli.io import open_checkpoint
from merge_cli.io.quantized import (
    DequantizedCheckpoint,
    dequantize_mxfp4,
    dequantizing,
    quantize_fp8_block,
    unmergeable,
)
from tests import quantized_models as qm


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    path = tmp_path_factory.mktemp("deepseek_fp8")
    return path, qm.make_deepseek_fp8(path, seed=0)


def test_fp8_view_hides_scales_and_dequantizes_whole_tensors(deepseek):
    path, expected = deepseek
    view = dequantizing(open_checkpoint(str(path)))
    assert isinstance(view, DequantizedCheckpoint)
    names = view.tensor_names()
    assert not [n for n in names if n.endswith("_scale_inv")]
    assert sorted(names) == sorted(expected)
    name = "model.layers.1.mlp.experts.2.gate_proj.weight"
    assert view.info(name).dtype == torch.float32 and view.info(name).shape == (128, 256)
    assert view.row_block(name) == 128
    for name in expected:
        assert torch.equal(view.read(name), expected[name]), name


@pytest.mark.parametrize("rows", [(0, 128), (5, 200), (90, 96), (127, 129)])
def test_fp8_view_row_reads_match_the_whole_tensor(deepseek, rows):
    path, expected = deepseek
    view = dequantizing(open_checkpoint(str(path)))
    for name in (
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.self_attn.kv_b_proj.weight",
    ):
        part = view.read(name, rows)
        assert torch.equal(part, expected[name][rows[0] : rows[1]]), (name, rows)


def test_quantize_fp8_block_round_trips_within_fp8_rounding():
    torch.manual_seed(0)
    values = torch.randn(300, 200)
    data, scale = quantize_fp8_block(values, (128, 128))
    assert data.dtype == torch.float8_e4m3fn and scale.shape == (3, 2)
    back = qm.dequantize_blocks(data, scale)
    # E4M3 keeps 3 mantissa bits: half a step is 2**-4 of the value, at most of the block max
    block_max = scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200] * 448
    assert ((back - values).abs() <= block_max * 2**-4).all()
    assert (back - values).abs().max() > 0  # it did round
    zeros, zero_scale = quantize_fp8_block(torch.zeros(4, 4), (128, 128))
    assert zero_scale.tolist() == [[1.0]] and zeros.float().abs().sum() == 0


def test_mxfp4_matches_the_ocp_definition():
    # one group: codes 0..15 twice, exponent 128 (x2); the E2M1 table, doubled
    blocks = torch.tensor([[k | (k << 4) for k in range(16)]], dtype=torch.uint8)
    scales = torch.tensor([128], dtype=torch.uint8)
    values = dequantize_mxfp4(blocks, scales)
    assert values.shape == (32,)
    assert values[0::2].tolist() == [2 * v for v in qm.FP4]
    assert torch.equal(values, qm.dequantize_mxfp4(blocks, scales))


def test_mxfp4_view_transposes_stacked_experts(tmp_path):
    expected = qm.make_gpt_oss_mxfp4(tmp_path, seed=0)
    view = dequantizing(open_checkpoint(str(tmp_path)))
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert name + "_blocks" not in view.tensor_names() and name in view.tensor_names()
    assert view.info(name).shape == (4, 64, 192)  # (experts, hidden, 2 x intermediate)
    assert view.info("model.layers.0.mlp.experts.down_proj").shape == (4, 96, 64)
    for key in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        assert torch.equal(view.read(key), expected[key])
        assert torch.equal(view.read(key, (1, 3)), expected[key][1:3])


def test_compressed_tensors_fp8_channel_view(tmp_path):
    pytest.importorskip("compressed_tensors")
    expected = qm.make_qwen3_moe_compressed(tmp_path, seed=0)
    view = dequantizing(open_checkpoint(str(tmp_path)))
    assert not [n for n in view.tensor_names() if n.endswith("weight_scale")]
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.experts.3.up_proj.weight",
    ):
        assert torch.allclose(view.read(name), expected[name], rtol=1e-6, atol=0)
        assert torch.allclose(view.read(name, (3, 9)), expected[name][3:9], rtol=1e-6, atol=0)


def _corrupt(path, edit):
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def test_fp8_refusals_name_the_tensor(tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"  # 384 x 256: 3 x 2 blocks
    qm.make_deepseek_fp8(tmp_path, seed=0)
    _corrupt(tmp_path, lambda s: s.__setitem__(name + "_scale_inv", torch.ones(2, 2)))
    with pytest.raises(CheckpointError, match=r"has shape \[2, 2\]; expected \[3, 2\]"):
        dequantizing(open_checkpoint(str(tmp_path)))
    _corrupt(tmp_path, lambda s: s.pop(name + "_scale_inv"))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is float8_e4m3fn .* no scale"):
        dequantizing(open_checkpoint(str(tmp_path)))
    qm.write_config(tmp_path, {**qm.FP8_CONFIG, "quant_method": "awq"})
    with pytest.raises(CheckpointError, match="unknown quant_method 'awq'"):
        dequantizing(open_checkpoint(str(tmp_path)))


def test_unmergeable_without_quantization_config(tmp_path):
    qm.make_deepseek_fp8(tmp_path, seed=0)
    qm.write_config(tmp_path, None)
    raw = dequantizing(open_checkpoint(str(tmp_path)))
    assert not isinstance(raw, DequantizedCheckpoint)
    weight = "model.layers.0.mlp.up_proj.weight"
    assert "float8_e4m3fn (FP8)" in unmergeable(raw, weight)
    assert "quantization scale of" in unmergeable(raw, weight + "_scale_inv")
    assert unmergeable(raw, "model.layers.0.input_layernorm.weight") is None


@pytest.mark.parametrize(
    ("fmt", "dtype", "scale_shape"),
    [
        ("e4m3", torch.float8_e4m3fn, (40, 1)),
        ("e5m2", torch.float8_e5m2, (40,)),
        ("e4m3", torch.float8_e4m3fn, ()),
    ],
    ids=["per-channel", "per-channel-e5m2", "per-tensor"],
)
def test_fp8_without_blocks_scales_per_channel_or_tensor(tmp_path, fmt, dtype, scale_shape):
    torch.manual_seed(0)
    data = torch.randn(40, 24).to(dtype)
    scale = torch.rand(scale_shape) + 0.5
    save_file(
        {
            "model.layers.0.mlp.up_proj.weight": data,
            "model.layers.0.mlp.up_proj.weight_scale_inv": scale,
        },
        tmp_path / "model.safetensors",
    )
    config = {"quantization_config": {"quant_method": "fp8", "fmt": fmt}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    view = dequantizing(open_checkpoint(str(tmp_path)))
    expected = data.float() * (scale.reshape(-1, 1) if scale.dim() else scale)
    name = "model.layers.0.mlp.up_proj.weight"
    assert view.tensor_names() == [name]
    assert torch.equal(view.read(name), expected)
    assert torch.equal(view.read(name, (7, 19)), expected[7:19])
    assert view.stored_bytes(name) == 40 * 24 + scale.numel() * 4
