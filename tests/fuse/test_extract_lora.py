"""merge-cli extract-lora: truncated SVD of a fine-tune's task vector as a PEFT adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_cli.io.adapters import open_model
from merge_cli.io.checkpoint import read_state_dict
from tests.conftest import load_safetensors_dir

PROMPT = torch.tensor([[1, 5, 17, 42, 99, 3, 250, 7]])


def causal_lm(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def with_adapter(base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(causal_lm(base), adapter).eval()


def test_full_rank_reproduces_the_fine_tune(cli, tiny_llamas, tmp_path):
    out = tmp_path / "adapter"
    code, stdout, err = cli(
        "extract-lora", tiny_llamas["math"], "--base", tiny_llamas["base"],
        "--rank", 64, "--out", out, "--embeddings", "--json",
    )  # fmt: skip
    assert code == 0, err
    reports = {r["name"]: r for r in json.loads(stdout)["tensors"]}
    assert reports["model.layers.0.mlp.up_proj.weight"]["rank"] == 64  # min(176, 64)
    assert reports["model.embed_tokens.weight"]["kind"] == "embedding"
    assert reports["model.norm.weight"]["kind"] == "unchanged"  # 1 + 5e-5 is 1 in bf16
    assert all(r["energy"] == pytest.approx(1.0) for r in reports.values())
    # PEFT loads it, and the logits are the fine-tune's.
    adapted = with_adapter(tiny_llamas["base"], out)
    with torch.no_grad():
        expected = causal_lm(tiny_llamas["math"])(PROMPT).logits
        got = adapted(PROMPT).logits
        merged = adapted.merge_and_unload()(PROMPT).logits
    assert (got - expected).abs().max() <= 1e-4
    assert (merged - expected).abs().max() <= 1e-4
    assert (expected - causal_lm(tiny_llamas["base"])(PROMPT).logits).abs().max() > 1e-2
    # transformers generates with it
    tokens = adapted.generate(PROMPT, max_new_tokens=5, do_sample=False)
    assert tokens.shape == (1, PROMPT.shape[1] + 5)
    # merge-cli applies it as a lora: input too
    fine_tune = load_safetensors_dir(tiny_llamas["math"])
    applied = read_state_dict(open_model(str(tiny_llamas["base"]), str(out)))
    assert max((applied[n].float() - fine_tune[n].float()).abs().max() for n in fine_tune) < 1e-5


def test_rank_cap_reports_the_error_it_makes(cli, tiny_llamas, tmp_path):
    out = tmp_path / "adapter"
    args = ["--base", tiny_llamas["base"], "--rank", 4, "--out", out]
    code, stdout, err = cli("extract-lora", tiny_llamas["code"], *args, "--json")
    assert code == 0, err
    reports = {r["name"]: r for r in json.loads(stdout)["tensors"]}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and config["rank_pattern"] == {}
    assert "model.embed_tokens" in config["modules_to_save"]  # embeddings kept whole by default
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights["base_model.model.model.embed_tokens.weight"].dtype == torch.bfloat16
    base, model = (
        load_safetensors_dir(tiny_llamas["base"]),
        load_safetensors_dir(tiny_llamas["code"]),
    )
    name = "model.layers.1.self_attn.o_proj.weight"
    prefix = "base_model.model.model.layers.1.self_attn.o_proj"
    b, a = weights[f"{prefix}.lora_B.weight"], weights[f"{prefix}.lora_A.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4)
    delta = model[name].float() - base[name].float()
    error = torch.linalg.norm(delta - b @ a) / torch.linalg.norm(delta)
    assert reports[name]["relative_error"] == pytest.approx(float(error), rel=1e-4)
    assert 0 < reports[name]["energy"] < 1
    # the best rank-4 approximation: no other rank-4 matrix is closer (Eckart–Young)
    s = torch.linalg.svdvals(delta)
    assert float(error) == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-4)
    code, stdout, _ = cli("extract-lora", tiny_llamas["code"], *args)
    assert code == 1  # the output exists
    code, stdout, _ = cli("extract-lora", tiny_llamas["code"], *args, "--overwrite")
    assert code == 0 and "retained energy" in stdout


def test_sv_epsilon_finds_the_rank_of_a_low_rank_fine_tune(cli, tiny_llamas, tmp_path):
    base = load_safetensors_dir(tiny_llamas["base"])
    generator = torch.Generator().manual_seed(0)
    tuned = {}
    for name, tensor in base.items():
        tensor = tensor.float()
        if name.endswith("proj.weight"):
            u = torch.randn(tensor.shape[0], 3, generator=generator)
            v = torch.randn(3, tensor.shape[1], generator=generator)
            tensor = tensor + 0.01 * u @ v
        tuned[name] = tensor
    (tmp_path / "tuned").mkdir()
    save_file(tuned, str(tmp_path / "tuned" / "model.safetensors"))
    out = tmp_path / "adapter"
    code, stdout, err = cli(
        "extract-lora", tmp_path / "tuned", "--base", tiny_llamas["base"],
        "--rank", 16, "--sv-epsilon", 1e-3, "--out", out, "--json",
    )  # fmt: skip
    assert code == 0, err
    reports = [r for r in json.loads(stdout)["tensors"] if r["kind"] == "lora"]
    assert len(reports) == 4 * 7  # q k v o gate up down of 4 layers
    assert {r["rank"] for r in reports} == {3}
    assert min(r["energy"] for r in reports) > 1 - 1e-5
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None  # the base's bf16 weights came back as float32
    assert set(config["rank_pattern"].values()) == {3}


def test_bad_inputs(cli, tiny_llamas, tmp_path):
    out = tmp_path / "adapter"
    common = ["--rank", 4, "--out", out]
    code, _, err = cli("extract-lora", tiny_llamas["base"], "--base", tiny_llamas["base"], *common)
    assert code == 1 and "every tensor equals the base's" in " ".join(err.split())
    other = tmp_path / "other"
    other.mkdir()
    state = load_safetensors_dir(tiny_llamas["math"])
    state["lm_head.weight"] = torch.zeros(300, 64)
    save_file(state, str(other / "model.safetensors"))
    code, _, err = cli("extract-lora", other, "--base", tiny_llamas["base"], *common)
    text = " ".join(err.split())
    assert code == 1 and "tensor 'lm_head.weight' is [300, 64] but [256, 64] in the base" in text
    code, _, err = cli(
        "extract-lora", tiny_llamas["math"], "--base", tiny_llamas["base"], *common,
        "--sv-epsilon", 1.5,
    )  # fmt: skip
    assert code == 1 and "--sv-epsilon: must be in [0, 1)" in err
    assert not out.exists()


def test_changed_biases_become_lora_bias(cli, tmp_path):
    """An MLP whose biases changed too: every decomposed layer has a bias, so the bias deltas
    go to PEFT's lora_B.bias and the adapter reproduces the fine-tune through PEFT."""
    from peft import PeftModel

    def mlp():
        return torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
            torch.nn.Linear(16, 4),
        )  # fmt: skip

    torch.manual_seed(0)
    base, tuned = mlp(), mlp()
    with torch.no_grad():
        for p, q in zip(base.parameters(), tuned.parameters(), strict=True):
            q.copy_(p + 0.1 * torch.randn(p.shape))
    for name, model in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        save_file(dict(model.state_dict()), str(tmp_path / name / "model.safetensors"))
    out = tmp_path / "adapter"
    code, stdout, err = cli(
        "extract-lora", tmp_path / "tuned", "--base", tmp_path / "base", "--rank", 16,
        "--out", out, "--json",
    )  # fmt: skip
    assert code == 0, err
    kinds = {r["name"]: r["kind"] for r in json.loads(stdout)["tensors"]}
    assert kinds == {
        **{f"{i}.weight": "lora" for i in (0, 2, 4)},
        **{f"{i}.bias": "lora_bias" for i in (0, 2, 4)},
    }
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["modules_to_save"] is None
    x = torch.randn(5, 8)
    fresh = mlp()
    fresh.load_state_dict(base.state_dict())
    adapted = PeftModel.from_pretrained(fresh, out)
    with torch.no_grad():
        expected = tuned(x)
        assert (adapted(x) - expected).abs().max() <= 1e-5
        assert (adapted.merge_and_unload()(x) - expected).abs().max() <= 1e-5
    applied = read_state_dict(open_model(str(tmp_path / "base"), str(out)))
    assert max((applied[n] - t).abs().max() for n, t in tuned.state_dict().items()) <= 1e-5


def test_extract_section_checks_and_plan(cli, tiny_llamas, tmp_path):
    from merge_cli.config import recipe_from_dict
    from merge_cli.errors import RecipeError
    from merge_cli.pipeline import plan

    models = {"base": str(tiny_llamas["base"]), "math": str(tiny_llamas["math"])}
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict(
            {
                "models": models,
                "extract": {"model": "maths", "base": "base", "rank": 0},
                "fuse": {"method": "linear"},
                "save": {"path": str(tmp_path / "out")},
            }
        )
    assert "extract.rank: Input should be greater than or equal to 1" in str(caught.value)
    recipe = {"models": models, "extract": {"model": "maths", "base": "base", "rank": 4}}
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict({**recipe, "fuse": {"method": "linear"}})
    text = str(caught.value)
    assert "extract.model: no model named 'maths' in models" in text
    assert "extract: a recipe either fuses (fuse) or extracts an adapter (extract)" in text
    assert "save.path: required to extract an adapter" in text
    good = recipe_from_dict(
        {**recipe, "extract": {"model": "math", "base": "base", "rank": 4}}, out=str(tmp_path / "o")
    )
    summary = plan(good)
    assert summary["stages"] == ["load", "extract-lora", "save (adapter)"]
    assert summary["matrices"] == 4 * 7 + 2 and "rank ≤ 4" in summary["note"]
    assert not (tmp_path / "o").exists()
