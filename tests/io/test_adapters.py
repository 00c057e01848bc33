"""LoRA adapters applied on read (merge_cli/io/adapters.py) against PEFT's merge_and_unload."""

from __future__ import annotations

import json

import pytest
import torch

from merge_cli.errors import CheckpointError
from merge_cli.io.adapters import AdapterCheckpoint, lora_delta, open_model
from merge_cli.io.checkpoint import read_state_dict
from tests.peft_models import (
    ATTENTION,
    CONFIG,
    build_adapter,
    build_base,
    merged_and_unloaded,
)

#: LoRA settings exercised: each adapter is made by PEFT with these LoraConfig arguments.
VARIANTS = {
    "plain": {},
    "rslora_patterns_embedding_modules_to_save": {
        "use_rslora": True,
        "target_modules": [*ATTENTION, "gate_proj", "embed_tokens"],
        "rank_pattern": {"v_proj": 2},
        "alpha_pattern": {"o_proj": 3},
        "modules_to_save": ["lm_head"],
    },
    "dora": {"use_dora": True, "target_modules": ["q_proj", "down_proj"]},
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_llama")
    base = build_base(root / "base")
    adapters = {
        name: build_adapter(base, root / name, seed=i + 1, **settings)
        for i, (name, settings) in enumerate(VARIANTS.items())
    }
    return base, adapters


def assert_matches_peft(checkpoint, reference, rows=None):
    """Every tensor read (whole, or in row chunks of ``rows``) equals PEFT's within 1e-6."""
    assert set(checkpoint.tensor_names()) <= set(reference)
    for name in checkpoint.tensor_names():
        expected = reference[name]
        if rows is None or not expected.dim():
            got = checkpoint.read(name)
        else:
            n = expected.shape[0]
            got = torch.cat(
                [checkpoint.read(name, (s, min(n, s + rows))) for s in range(0, n, rows)]
            )
        assert got.shape == expected.shape, name
        assert (got.float() - expected).abs().max() <= 1e-6, name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adapter_view_equals_merge_and_unload(llama, variant):
    base, adapters = llama
    reference = merged_and_unloaded(base, adapters[variant])
    checkpoint = open_model(str(base), str(adapters[variant]))
    assert isinstance(checkpoint, AdapterCheckpoint)
    assert_matches_peft(checkpoint, reference)
    assert_matches_peft(checkpoint, reference, rows=7)  # row chunks as the executor reads them
    # The adapter did something, on the tensors it targets only.
    plain = read_state_dict(open_model(str(base)))
    changed = {n for n in plain if not torch.equal(plain[n], reference[n])}
    assert changed == set(checkpoint.adapter.modules) | set(checkpoint.adapter.replaced)
    assert len(changed) >= 4


def test_adapter_view_knows_scaling(llama):
    base, adapters = llama
    checkpoint = open_model(str(base), str(adapters["rslora_patterns_embedding_modules_to_save"]))
    modules = checkpoint.adapter.modules
    q = modules["model.layers.0.self_attn.q_proj.weight"]
    v = modules["model.layers.0.self_attn.v_proj.weight"]
    o = modules["model.layers.1.self_attn.o_proj.weight"]
    embed = modules["model.embed_tokens.weight"]
    assert q.scale == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r) = 8 / sqrt(4)
    assert v.scale == pytest.approx(8 / 2**0.5)  # rank_pattern: r = 2
    assert o.scale == pytest.approx(3 / 2)  # alpha_pattern: alpha = 3
    assert embed.transposed and not q.transposed
    assert "lm_head.weight" in checkpoint.adapter.replaced


def test_lora_delta_rows_and_transpose():
    a, b = torch.randn(3, 5), torch.randn(4, 3)
    full = lora_delta(a, b, 2.0, transposed=False)
    assert torch.allclose(full, 2.0 * b @ a)
    assert torch.allclose(lora_delta(a, b, 2.0, False, rows=(1, 3)), full[1:3])
    full_t = lora_delta(a, b, 0.5, transposed=True)
    assert full_t.shape == (5, 4) and torch.allclose(full_t, 0.5 * (b @ a).T)
    assert torch.allclose(lora_delta(a, b, 0.5, True, rows=(2, 5)), full_t[2:5])


def test_fan_in_fan_out_and_dora_on_gpt2(tmp_path):
    """GPT-2's Conv1D stores weights in × out: PEFT's fan_in_fan_out, with and without DoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    for dora in (False, True):
        settings = LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=dora
        )
        model = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), settings)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.add_(0.1 * torch.randn(parameter.shape))
        model.save_pretrained(tmp_path / f"adapter{dora}")
        reference = merged_and_unloaded_gpt2(tmp_path / "base", tmp_path / f"adapter{dora}")
        checkpoint = open_model(str(tmp_path / "base"), str(tmp_path / f"adapter{dora}"))
        assert all(m.transposed for m in checkpoint.adapter.modules.values())
        assert_matches_peft(checkpoint, reference)
        assert_matches_peft(checkpoint, reference, rows=5)


def merged_and_unloaded_gpt2(base, adapter):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), adapter)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def test_lora_bias(tmp_path):
    base = build_base(tmp_path / "base", config={**CONFIG, "attention_bias": True})
    adapter = build_adapter(
        base, tmp_path / "adapter", seed=5, lora_bias=True, target_modules=["q_proj"]
    )
    checkpoint = open_model(str(base), str(adapter))
    reference = merged_and_unloaded(base, adapter)
    assert_matches_peft(checkpoint, reference)
    plain = open_model(str(base))
    bias = "model.layers.0.self_attn.q_proj.bias"
    assert not torch.equal(plain.read(bias), reference[bias])


# -- bad adapters: refused when opened, before any tensor data is read ---------------------


def test_adapter_of_another_base(tmp_path, llama):
    base, _ = llama
    other = build_base(tmp_path / "other", config={**CONFIG, "hidden_size": 48})
    adapter = build_adapter(other, tmp_path / "adapter", seed=1)
    message = r"B·A is \[\d+, 48\] but the base's 'model.layers.0.self_attn"
    with pytest.raises(CheckpointError, match=message):
        open_model(str(base), str(adapter))


def test_missing_adapter_config(tmp_path, llama):
    base, adapters = llama
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(
        (adapters["plain"] / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(CheckpointError, match="not a PEFT adapter: adapter_config.json is missing"):
        open_model(str(base), str(tmp_path / "adapter"))


def test_modules_absent_from_base(tmp_path, llama):
    base, _ = llama
    deeper = build_base(tmp_path / "deeper", config={**CONFIG, "num_hidden_layers": 3})
    adapter = build_adapter(deeper, tmp_path / "adapter", seed=1)
    with pytest.raises(CheckpointError, match=r"adapts modules absent from the base .*layers\.2"):
        open_model(str(base), str(adapter))


def test_target_modules_match_nothing(tmp_path, llama):
    base, adapters = llama
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(
        (adapters["plain"] / "adapter_model.safetensors").read_bytes()
    )
    config = json.loads((adapters["plain"] / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["qkv"]}))
    with pytest.raises(CheckpointError, match=r"target_modules \['qkv'\] match no module"):
        open_model(str(base), str(adapter))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "IA3"}, "only LoRA adapters"),
        ({"r": 8}, "lora_A has rank 4, adapter_config.json says r = 8"),
        ({"layer_replication": [[0, 2]]}, "layer_replication is set"),
        ({"lora_alpha": None}, "lora_alpha must be a positive number"),
    ],
)
def test_config_refusals(tmp_path, llama, change, message):
    base, adapters = llama
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(
        (adapters["plain"] / "adapter_model.safetensors").read_bytes()
    )
    config = json.loads((adapters["plain"] / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message):
        open_model(str(base), str(adapter))


def test_hub_adapter_from_the_local_cache(tmp_path, llama, monkeypatch):
    """``lora: hf://org/name@rev`` resolves through huggingface_hub's cache (offline here)."""
    import shutil

    from huggingface_hub import constants

    base, adapters = llama
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    revision = "0123456789abcdef" * 2 + "01234567"
    snapshot = tmp_path / "hub" / "models--org--adapter" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapters["plain"] / name, snapshot / name)
    checkpoint = open_model(str(base), f"hf://org/adapter@{revision}")
    local = open_model(str(base), str(adapters["plain"]))
    name = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(checkpoint.read(name), local.read(name))
    with pytest.raises(CheckpointError, match="not in the local Hub cache"):
        open_model(str(base), "hf://org/missing@" + revision)
