"""MoE assembly: a Mixtral checkpoint that transformers loads and that routes as assembled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merge_cli.config import recipe_from_dict
from merge_cli.errors import PlanError, RecipeError
from merge_cli.pipeline import run
from tests.conftest import REPO, load_safetensors_dir

transformers = pytest.importorskip("transformers")

PROMPTS = {"math": [[1, 17, 42, 99, 3], [1, 17, 58, 7]], "code": [[1, 200, 201, 202, 203]]}
NEGATIVE = [[1, 5, 6]]


def moe_recipe(paths: dict[str, Path], out: Path, **params) -> dict:
    return {
        "models": {name: str(path) for name, path in paths.items()},
        "fuse": {
            "method": "moe",
            "base": "base",
            "models": {
                "math": {"positive_prompts": PROMPTS["math"]},
                "code": {"positive_prompts": PROMPTS["code"], "negative_prompts": NEGATIVE},
            },
            "params": params,
        },
        "save": {"path": str(out), "dtype": "float32"},
    }


def assemble(paths: dict[str, Path], out: Path, **params) -> Path:
    return run(recipe_from_dict(moe_recipe(paths, out, **params))).output


def test_moe_layout_and_config(tiny_llamas, tmp_path):
    out = assemble(tiny_llamas, tmp_path / "moe", gate_mode="uniform", num_experts_per_tok=1)
    moe = load_safetensors_dir(out)
    base = load_safetensors_dir(tiny_llamas["base"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (2, 1)
    assert not any(".mlp." in name for name in moe)
    for layer in range(4):
        assert moe[f"model.layers.{layer}.block_sparse_moe.gate.weight"].shape == (2, 64)
        assert moe[f"model.layers.{layer}.block_sparse_moe.gate.weight"].abs().max() == 0
        for index, name in enumerate(["math", "code"]):
            expert = load_safetensors_dir(tiny_llamas[name])
            for projection, short in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                got = moe[f"model.layers.{layer}.block_sparse_moe.experts.{index}.{short}.weight"]
                assert torch.equal(got, expert[f"model.layers.{layer}.mlp.{projection}.weight"])
        attention = f"model.layers.{layer}.self_attn.q_proj.weight"
        assert torch.equal(moe[attention], base[attention])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(moe[name], base[name])


def with_bias_unit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make coordinate 0 of the residual stream a constant 1 (a "bias unit").

    Embeddings set it to 1 and no attention or MLP output writes to it, so the router input
    (the post-attention RMS norm of the stream) has a positive coordinate 0 for every token:
    a router row ``+c e_0`` beats ``-c e_0`` everywhere — the router is forced.
    """
    state = {name: tensor.clone() for name, tensor in state.items()}
    state["model.embed_tokens.weight"][:, 0] = 1.0
    for name, tensor in state.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            tensor[0] = 0.0
    return state


def test_forced_router_gives_the_dense_experts_logits(example_models, tmp_path):
    config = example_models.CONFIG
    base = with_bias_unit(example_models.llama_state_dict(config, seed=0))
    experts = {
        "math": with_bias_unit(example_models.variant(base, seed=1, scale=0.2)),
        "code": with_bias_unit(example_models.variant(base, seed=2, scale=0.2)),
    }
    paths = {"base": tmp_path / "base"}
    example_models.save_hf_directory(base, paths["base"], config, dtype=torch.float32)
    for name, state in experts.items():
        paths[name] = tmp_path / name
        example_models.save_hf_directory(state, paths[name], config, dtype=torch.float32)
    out = assemble(paths, tmp_path / "moe", gate_mode="uniform", num_experts_per_tok=1)

    moe, info = transformers.MixtralForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for index, name in enumerate(experts):
        with torch.no_grad():
            for layer in moe.model.layers:
                gate = torch.full((2, 64), 0.0)
                gate[:, 0] = -100.0
                gate[index, 0] = 100.0
                layer.mlp.gate.weight.copy_(gate)
            result = moe(ids, output_router_logits=True)
        routed = torch.stack([r.argmax(-1) for r in result.router_logits])
        assert (routed == index).all()
        dense_state = {
            k: (experts[name][k] if ".mlp." in k else v).float() for k, v in base.items()
        }
        dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).float()
        dense.load_state_dict(dense_state)
        with torch.no_grad():
            expected = dense.eval()(ids).logits
        difference = float((result.logits - expected).abs().max())
        print(f"router forced to expert {index} ({name}): max |moe - dense| = {difference:.2e}")
        assert difference < 1e-5
        logits[name] = result.logits
    assert (logits["math"] - logits["code"]).abs().max() > 1e-2  # the experts do differ


def reference_gates(base_dir: Path, prompts: list[list[int]], average: bool) -> torch.Tensor:
    """Independently: normalised mean hidden states entering each layer, via transformers."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    rows = []
    for ids in prompts:
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        rows.append(torch.stack([h[0].mean(0) if average else h[0, -1] for h in hidden[:4]]))
    return torch.stack(rows).mean(0)


@pytest.mark.parametrize("gate_mode", ["hidden", "hidden_avg"])
def test_hidden_router_is_the_normalised_prompt_state(tiny_llamas, tmp_path, gate_mode):
    out = assemble(tiny_llamas, tmp_path / "moe", gate_mode=gate_mode)
    moe = load_safetensors_dir(out)
    average = gate_mode == "hidden_avg"
    math = reference_gates(tiny_llamas["base"], PROMPTS["math"], average)
    code = reference_gates(tiny_llamas["base"], PROMPTS["code"], average)
    code = code - reference_gates(tiny_llamas["base"], NEGATIVE, average)
    for layer in range(4):
        gate = moe[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        for row, vector in enumerate((math[layer], code[layer])):
            torch.testing.assert_close(gate[row], vector / vector.norm(), atol=1e-5, rtol=1e-4)


def test_random_router_is_seeded(tiny_llamas, tmp_path):
    first = load_safetensors_dir(assemble(tiny_llamas, tmp_path / "a", gate_mode="random"))
    again = load_safetensors_dir(assemble(tiny_llamas, tmp_path / "b", gate_mode="random"))
    gate = first["model.layers.2.block_sparse_moe.gate.weight"]
    assert torch.equal(gate, again["model.layers.2.block_sparse_moe.gate.weight"])
    assert 0.01 < float(gate.std()) < 0.03  # initializer_range 0.02


def test_moe_errors_name_the_problem(tiny_llamas, tmp_path):
    recipe = moe_recipe(tiny_llamas, tmp_path / "moe", num_experts_per_tok=3)
    with pytest.raises(PlanError, match="num_experts_per_tok: 3 is more than the 2 expert"):
        run(recipe_from_dict(recipe))
    recipe = moe_recipe(tiny_llamas, tmp_path / "moe")
    del recipe["fuse"]["models"]["code"]["positive_prompts"]
    with pytest.raises(PlanError, match=r"fuse.models.code.positive_prompts: gate_mode 'hidden'"):
        run(recipe_from_dict(recipe))
    recipe = moe_recipe(tiny_llamas, tmp_path / "moe")
    recipe["fuse"]["models"]["math"]["positive_prompts"] = [[1, 999]]
    with pytest.raises(PlanError, match=r"token ids must be in \[0, 256\)"):
        run(recipe_from_dict(recipe))
    recipe["fuse"]["params"] = {"gate_mode": "learned"}
    with pytest.raises(RecipeError, match="fuse.params.gate_mode"):
        recipe_from_dict(recipe)
    assert not (tmp_path / "moe").exists()


def test_moe_recipe_runs(tiny_llamas, tmp_path, monkeypatch, cli):
    for name, path in tiny_llamas.items():
        (tmp_path / "examples" / "models").mkdir(parents=True, exist_ok=True)
        (tmp_path / "examples" / "models" / name).symlink_to(path)
    monkeypatch.chdir(tmp_path)
    recipe = REPO / "recipes" / "ensemble" / "moe.yaml"
    code, out, err = cli("plan", recipe, "--json")
    assert code == 0, err
    assert json.loads(out)["tensors"] == 3 + 4 * (9 + 1 + 2 * 3 - 3)
    code, out, err = cli("run", recipe, "--out", tmp_path / "out", "--json")
    assert code == 0, err
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_experts_per_tok == 2


def test_text_prompts_use_the_base_tokenizer_with_bos(tiny_llamas, tmp_path):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    paths = dict(tiny_llamas)
    paths["base"] = tmp_path / "base"
    shutil.copytree(tiny_llamas["base"], paths["base"])
    fast.save_pretrained(paths["base"])
    raw = moe_recipe(paths, tmp_path / "moe")
    raw["fuse"]["models"] = {
        "math": {"positive_prompts": ["w17 w42 w99", "w17 w58"]},
        "code": {"positive_prompts": ["w200 w201 w202"]},
    }
    moe = load_safetensors_dir(run(recipe_from_dict(raw)).output)
    math = reference_gates(paths["base"], [[1, 17, 42, 99], [1, 17, 58]], average=False)
    code = reference_gates(paths["base"], [[1, 200, 201, 202]], average=False)
    for layer in range(4):
        gate = moe[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        torch.testing.assert_close(gate[0], math[layer] / math[layer].norm(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gate[1], code[layer] / code[layer].norm(), atol=1e-5, rtol=1e-4)
    assert (tmp_path / "moe" / "tokenizer_config.json").exists()  # copied from the base
