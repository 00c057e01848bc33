"""Merging quantized checkpoints end to end: FP8 (DeepSeek-V3), MXFP4 (gpt-oss),
compressed-tensors FP8, requantized FP8 output, MoE rules, and the refusals."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_cli.config import load_recipe
from merge_cli.options import RunOptions
from merge_cli.pipeline import run
from tests import quantized_models as qm


def write_recipe(tmp_path, a, b, save: str = "dtype: float32", fuse: str = "", name="recipe"):
    text = f"""
models:
  a: {a}
  b: {b}
fuse:
  method: linear
  models:
    a: {{weight: 0.7}}
    b: {{weight: 0.3}}
{fuse}
save:
  path: {tmp_path / "out"}
  {save}
"""
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def deepseek_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek_pair")
    states = [qm.make_deepseek_fp8(root / name, seed) for seed, name in enumerate("ab")]
    return root / "a", root / "b", states


def _logits(path, state=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    if state is None:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"], info
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        model.to(torch.float32)
        model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 3, 7, 2]])).logits


def _saved_reference(tmp_path, state, config_from):
    """``state`` saved as a checkpoint beside ``config_from``'s config.json."""
    reference = tmp_path / "reference"
    reference.mkdir()
    save_file(state, reference / "model.safetensors", metadata={"format": "pt"})
    (reference / "config.json").write_text((config_from / "config.json").read_text())
    return reference


def test_fp8_linear_merge_equals_merge_of_dequantized_inputs(cli, deepseek_pair, tmp_path):
    a, b, states = deepseek_pair
    code, _, err = cli("run", write_recipe(tmp_path, a, b))
    assert code == 0, err
    out = tmp_path / "out"
    merged = load_file(out / "model.safetensors")
    expected = qm.linear(states, [0.7, 0.3])
    assert sorted(merged) == sorted(expected)  # no scale tensor left
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float32, name
        # float32 rounding of 0.7 a + 0.3 b
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-7)
    # an FP8 weight is merged, never copied from one input
    name = "model.layers.1.mlp.experts.0.down_proj.weight"
    assert not torch.equal(merged[name], states[0][name])
    assert (merged[name] - states[0][name]).abs().max() > 1e-3
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "deepseek_v3"
    # loads in transformers (per-expert names fused on load) with the reference's logits
    logits = _logits(out)
    reference = _logits(_saved_reference(tmp_path, expected, out))
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert logits.abs().max() > 0.1


def test_fp8_bf16_output_is_the_merge_rounded_once_and_loads(cli, deepseek_pair, tmp_path):
    a, b, states = deepseek_pair
    code, _, err = cli("run", write_recipe(tmp_path, a, b, save="dtype: bfloat16"))
    assert code == 0, err
    merged = load_file(tmp_path / "out" / "model.safetensors")
    expected = qm.linear(states, [0.7, 0.3])
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        # one bf16 rounding (2**-9 relative) of a value within float32 rounding of the merge
        torch.testing.assert_close(tensor.float(), expected[name], rtol=2**-8, atol=1e-7)
    _logits(tmp_path / "out")


def test_fp8_block_requantized_output_dequantizes_to_the_merge(deepseek_pair, tmp_path):
    a, b, states = deepseek_pair
    recipe = load_recipe(
        write_recipe(tmp_path, a, b, save="dtype: bfloat16\n  quantize: fp8_block")
    )
    # 200 float32 rows of 256: chunks of 128 rows (aligned to the blocks), several per tensor
    run(recipe, RunOptions(chunk_bytes=200 * 256 * 4))
    out = tmp_path / "out"
    merged = load_file(out / "model.safetensors")
    expected = qm.linear(states, [0.7, 0.3])
    fp8 = [n for n in expected if qm.is_deepseek_fp8(n, expected[n])]
    assert len(fp8) == 26 and sorted(merged) == sorted(
        [*expected, *(n + "_scale_inv" for n in fp8)]
    )
    for name in fp8:
        data, scale = merged[name], merged[name + "_scale_inv"]
        assert data.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
        rows, cols = expected[name].shape
        assert scale.shape == ((rows + 127) // 128, (cols + 127) // 128)
        back = qm.dequantize_blocks(data, scale)
        block_max = scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
        # within one E4M3 rounding (half a step: 2**-4 of the block's largest value)
        assert ((back - expected[name]).abs() <= block_max * 448 * 2**-4 * (1 + 1e-6)).all()
    assert merged["model.norm.weight"].dtype == torch.bfloat16
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == qm.FP8_CONFIG


def test_quantize_needs_an_fp8_block_config_source(cli, tmp_path, tiny_llamas):
    recipe = write_recipe(
        tmp_path, tiny_llamas["math"], tiny_llamas["code"], save="quantize: fp8_block"
    )
    code, out, err = cli("validate", recipe)
    assert code == 1
    assert "save.quantize: fp8_block" in err and "not an FP8 block-quantized" in err


def _bad_scale_shape(state):
    state["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(2, 2)


def _no_scale(state):
    del state["model.layers.1.self_attn.o_proj.weight_scale_inv"]


@pytest.mark.parametrize(
    ("edit", "quantization", "message"),
    [
        (
            _no_scale,
            qm.FP8_CONFIG,
            "tensor 'model.layers.1.self_attn.o_proj.weight' is float8_e4m3fn (fp8) but has no "
            "scale 'model.layers.1.self_attn.o_proj.weight_scale_inv'",
        ),
        (
            _bad_scale_shape,
            qm.FP8_CONFIG,
            "scale 'model.layers.0.mlp.up_proj.weight_scale_inv' of tensor "
            "'model.layers.0.mlp.up_proj.weight' [384, 256] has shape [2, 2]; expected [3, 2]",
        ),
        (None, {**qm.FP8_CONFIG, "quant_method": "hqq"}, "unknown quant_method 'hqq'"),
        (
            None,
            None,
            "tensor 'model.layers.0.mlp.down_proj.weight' is float8_e4m3fn (FP8) in",
        ),
    ],
    ids=["missing-scale", "scale-shape", "unknown-method", "no-quantization-config"],
)
def test_bad_quantized_input_one_message_exit_1_nothing_written(
    cli, deepseek_pair, tmp_path, edit, quantization, message
):
    a, b, _ = deepseek_pair
    bad = tmp_path / "bad"
    bad.mkdir()
    for file in b.iterdir():
        (bad / file.name).write_bytes(file.read_bytes())
    if edit is not None:
        state = load_file(bad / "model.safetensors")
        edit(state)
        save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    qm.write_config(bad, quantization)
    # the bad model second (not the plan's reference); without a quantization_config, both
    # models are the FP8 files as stored (the case the plan once copied from the first)
    recipe = write_recipe(tmp_path, bad if quantization is None else a, bad)
    for command in ("validate", "plan", "run"):
        code, out, err = cli(command, recipe)
        assert code == 1, (command, out, err)
        err = " ".join(err.split())  # the terminal wraps long lines
        assert message in err and err.startswith("error:"), (command, err)
        assert err.count("error:") == 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_mxfp4_expert_merge_equals_merge_of_dequantized_and_loads(cli, tmp_path):
    states = [qm.make_gpt_oss_mxfp4(tmp_path / name, seed) for seed, name in enumerate("ab")]
    code, _, err = cli("run", write_recipe(tmp_path, tmp_path / "a", tmp_path / "b"))
    assert code == 0, err
    merged = load_file(tmp_path / "out" / "model.safetensors")
    expected = qm.linear(states, [0.7, 0.3])
    assert sorted(merged) == sorted(expected)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert merged[name].shape == (4, 64, 192)
    for key, tensor in merged.items():
        torch.testing.assert_close(
            tensor, expected[key], rtol=1e-6, atol=1e-7
        )  # float32 rounding of 0.7a + 0.3b
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    torch.testing.assert_close(
        _logits(tmp_path / "out"), _logits(tmp_path / "out", expected), rtol=1e-5, atol=1e-6
    )


def test_compressed_tensors_fp8_merge_equals_merge_of_dequantized(cli, tmp_path):
    pytest.importorskip("compressed_tensors")
    states = [qm.make_qwen3_moe_compressed(tmp_path / n, seed) for seed, n in enumerate("ab")]
    code, _, err = cli("run", write_recipe(tmp_path, tmp_path / "a", tmp_path / "b"))
    assert code == 0, err
    merged = load_file(tmp_path / "out" / "model.safetensors")
    expected = qm.linear(states, [0.7, 0.3])
    assert sorted(merged) == sorted(expected)
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-6, atol=1e-7)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    _logits(tmp_path / "out")  # loads with no missing or unexpected keys


def test_moe_rule_takes_routed_experts_only_from_the_second_model(cli, tmp_path):
    from transformers import Qwen3MoeForCausalLM

    states = [
        qm.save_model(Qwen3MoeForCausalLM, qm.qwen3_moe_config(), tmp_path / n, seed)
        for seed, n in enumerate("ab")
    ]
    rules = """  rules:
    - match: "*.mlp.experts.*"
      models: {a: {weight: 0.0}, b: {weight: 1.0}}
"""
    recipe = write_recipe(tmp_path, tmp_path / "a", tmp_path / "b", save="dtype: keep", fuse=rules)
    text = (
        recipe.read_text()
        .replace("a: {weight: 0.7}", "a: {weight: 1.0}")
        .replace("b: {weight: 0.3}", "b: {weight: 0.0}")
    )
    recipe.write_text(text)
    code, _, err = cli("run", recipe)
    assert code == 0, err
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(merged) == sorted(states[0])
    experts = [n for n in merged if ".mlp.experts." in n]
    assert len(experts) == 2 * 4 * 3
    for name, tensor in merged.items():
        source = states[1] if name in experts else states[0]
        # byte-identical: the router (mlp.gate), attention, norms, embeddings from a
        assert tensor.dtype == source[name].dtype
        assert tensor.view(torch.uint8).equal(source[name].view(torch.uint8)), name
    assert not merged["model.layers.0.mlp.gate.weight"].equal(
        states[1]["model.layers.0.mlp.gate.weight"]
    )
    _logits(tmp_path / "out")  # loads with no missing or unexpected keys


def test_fp8_inputs_are_read_in_block_aligned_chunks(deepseek_pair, tmp_path, monkeypatch):
    """Streaming: a weight larger than the chunk budget is read (and dequantized) a few
    whole 128-row blocks at a time, each scale row once, never whole."""
    from merge_cli.io.checkpoint import SafetensorsCheckpoint

    reads = []
    original = SafetensorsCheckpoint.read

    def spy(self, name, rows=None):
        reads.append((name, rows))
        return original(self, name, rows)

    monkeypatch.setattr(SafetensorsCheckpoint, "read", spy)
    a, b, states = deepseek_pair
    recipe = load_recipe(write_recipe(tmp_path, a, b))
    run(recipe, RunOptions(chunk_bytes=200 * 256 * 4))  # 200 float32 rows of 256
    name = "model.layers.0.mlp.gate_proj.weight"  # 384 x 256: three 128-row chunks
    chunks = [(0, 128), (128, 256), (256, 384)]
    assert sorted(rows for n, rows in reads if n == name) == sorted(chunks * 2)  # a and b
    scale_rows = sorted(rows for n, rows in reads if n == name + "_scale_inv")
    assert scale_rows == sorted([(0, 1), (1, 2), (2, 3)] * 2)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    expected = qm.linear(states, [0.7, 0.3])
    torch.testing.assert_close(merged[name], expected[name], rtol=1e-6, atol=1e-7)


def test_plan_counts_quantized_inputs_as_stored(cli, deepseek_pair, tmp_path):
    a, b, _ = deepseek_pair
    code, out, err = cli("plan", write_recipe(tmp_path, a, b), "--json")
    assert code == 0, err
    plan = json.loads(out)
    stored = sum(p.stat().st_size for p in (a / "model.safetensors", b / "model.safetensors"))
    # the files' bytes less their headers: FP8 data and scales, not float32
    assert 0.95 * stored < plan["bytes_read"] <= stored
    assert plan["config_updates"] == {"quantization_config": None}


def test_fp8_block_output_loads_in_transformers_with_its_quantization_config(
    deepseek_pair, tmp_path
):
    """transformers reads the requantized output as a fine-grained FP8 checkpoint (on CPU it
    dequantizes on load): no missing or unexpected keys, and the logits of the merge as
    written (dequantized here, block by block) up to its bf16 compute."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    a, b, _ = deepseek_pair
    recipe = load_recipe(
        write_recipe(tmp_path, a, b, save="dtype: bfloat16\n  quantize: fp8_block")
    )
    run(recipe)
    out = tmp_path / "out"
    # config.json says bfloat16 (save.dtype); computed in float32 here, like the reference
    model, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    model.eval()
    written = load_file(out / "model.safetensors")
    state = {
        n: qm.dequantize_blocks(t, written[n + "_scale_inv"]) if t.dtype.itemsize == 1 else t
        for n, t in written.items()
        if not n.endswith("_scale_inv")
    }
    reference = _saved_reference(tmp_path, {n: t.float() for n, t in state.items()}, out)
    config = json.loads((reference / "config.json").read_text())
    del config["quantization_config"]
    (reference / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 3, 7, 2]])).logits.float()
    expected = _logits(reference)
    torch.testing.assert_close(logits, expected, rtol=0.05, atol=0.02)
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()


def test_fp8_chimera_rule_takes_only_routed_experts_from_the_second_model(
    cli, deepseek_pair, tmp_path
):
    """DeepSeek-V3 layout, FP8 inputs: routed experts from b; shared experts, routers,
    attention and everything else exactly a's dequantized weights."""
    a, b, states = deepseek_pair
    rules = """  rules:
    - match: "*.mlp.experts.*"
      models: {a: {weight: 0.0}, b: {weight: 1.0}}
"""
    recipe = write_recipe(tmp_path, a, b, fuse=rules)
    text = recipe.read_text().replace("{weight: 0.7}", "{weight: 1.0}")
    recipe.write_text(text.replace("{weight: 0.3}", "{weight: 0.0}"))
    code, _, err = cli("run", recipe)
    assert code == 0, err
    merged = load_file(tmp_path / "out" / "model.safetensors")
    routed = [n for n in merged if ".mlp.experts." in n]
    assert len(routed) == 4 * 3
    for name, tensor in merged.items():
        assert torch.equal(tensor, states[1 if name in routed else 0][name]), name
    for part in ("mlp.shared_experts.up_proj.weight", "mlp.gate.weight", "self_attn.o_proj.weight"):
        name = f"model.layers.1.{part}"
        assert not torch.equal(merged[name], states[1][name])
    _logits(tmp_path / "out")


def test_compressed_tensors_without_the_package_is_refused_with_a_hint(cli, tmp_path, monkeypatch):
    pytest.importorskip("compressed_tensors")
    qm.make_qwen3_moe_compressed(tmp_path / "a", 0)
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import fails
    monkeypatch.setitem(sys.modules, "compressed_tensors.quantization", None)
    code, _, err = cli("validate", write_recipe(tmp_path, tmp_path / "a", tmp_path / "a"))
    assert code == 1
    err = " ".join(err.split())
    assert "needs the compressed-tensors package (pip install compressed-tensors" in err
