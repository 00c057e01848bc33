"""fuse.output: adapter — adapters of one base merged in adapter space, against PEFT's
add_weighted_adapter on the same adapters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from merge_cli.config import recipe_from_dict
from merge_cli.engine.executor import tensor_seed
from merge_cli.errors import PlanError, RecipeError
from merge_cli.options import RunOptions
from merge_cli.pipeline import open_models, plan, run
from tests.peft_models import ATTENTION, build_adapter, build_base, load_base

DETERMINISTIC = [
    "linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd",
]  # fmt: skip
WEIGHTS = {"math": 0.7, "code": -0.4}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("combinations")
    base = build_base(root / "base")
    targets = [*ATTENTION, "embed_tokens"]
    return base, {
        "math": build_adapter(base, root / "math", seed=21, target_modules=targets),
        "code": build_adapter(
            base,
            root / "code",
            seed=22,
            lora_alpha=6,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "up_proj"],
        ),  # fmt: skip
        "chat": build_adapter(base, root / "chat", seed=23, r=8, target_modules=["q_proj"]),
    }


def recipe_for(base, adapters, method, out, names=("math", "code"), **params):
    return recipe_from_dict(
        {
            "models": {n: {"path": str(base), "lora": str(adapters[n])} for n in names},
            "fuse": {
                "method": method,
                "output": "adapter",
                "models": {n: {"weight": WEIGHTS.get(n, 1.0)} for n in names},
                "params": params,
                "seed": 3,
            },
            "save": {"path": str(out)},
        }
    )


def peft_combination(base, adapters, method, names=("math", "code"), **params):
    """PEFT's add_weighted_adapter on the same adapters: the new adapter's tensors."""
    from peft import PeftModel, get_peft_model_state_dict

    model = PeftModel.from_pretrained(load_base(base), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    weights = [WEIGHTS.get(n, 1.0) for n in names]
    model.add_weighted_adapter(list(names), weights, "merged", combination_type=method, **params)
    state = get_peft_model_state_dict(model, adapter_name="merged")
    return {k: v for k, v in state.items() if ".lora_" in k}, model.peft_config["merged"]


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_equals_peft_add_weighted_adapter(tmp_path, adapters, method):
    base, paths = adapters
    params = {"density": 0.6} if method not in ("linear", "cat", "svd") else {}
    names = ("math", "code")
    if method in ("linear", "ties", "magnitude_prune"):
        names = ("math", "code")  # both rank 4, as PEFT requires for factor-space combinations
    out = tmp_path / "out"
    result = run(recipe_for(base, paths, method, out, names, **params), RunOptions())
    assert result.output == out
    got = load_file(str(out / "adapter_model.safetensors"))
    expected, expected_config = peft_combination(base, paths, method, names, **params)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].shape == tensor.shape, name
        assert (got[name] - tensor).abs().max() <= 1e-5, (name, method)
    assert any(bool(t.any()) for t in got.values())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == expected_config.r and config["lora_alpha"] == expected_config.lora_alpha
    assert set(config["target_modules"]) == set(expected_config.target_modules)
    assert config["use_rslora"] is False  # PEFT would keep the first adapter's (see combine.py)
    # the output loads in PEFT and changes the base's logits
    from peft import PeftModel

    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    loaded = PeftModel.from_pretrained(load_base(base), out).eval()
    with torch.no_grad():
        assert (loaded(tokens).logits - load_base(base)(tokens).logits).abs().max() > 1e-4


def test_cat_and_svd_take_different_ranks(tmp_path, adapters):
    base, paths = adapters
    names = ("math", "chat")  # ranks 4 and 8
    for method, rank, params in (("cat", 12, {}), ("svd", 6, {"svd_rank": 6})):
        out = tmp_path / method
        run(recipe_for(base, paths, method, out, names, **params), RunOptions())
        got = load_file(str(out / "adapter_model.safetensors"))
        expected, _ = peft_combination(base, paths, method, names, **params)
        assert max((got[n] - expected[n]).abs().max().item() for n in expected) <= 1e-5
        assert (
            got["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == rank
        )
    with pytest.raises(PlanError, match="every adapter needs the same rank; got 4, 8"):
        run(recipe_for(base, paths, "ties", tmp_path / "x", names, density=0.5), RunOptions())
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_ties_svd"])
def test_dare_is_peft_merge_utils_with_a_seeded_generator(tmp_path, adapters, method):
    """PEFT draws DARE's masks from torch's global generator; merge-cli from one seeded by
    fuse.seed and the module name. Given the same draws, the numbers are PEFT's."""
    from peft.utils import merge_utils

    base, paths = adapters
    out = tmp_path / "out"
    run(recipe_for(base, paths, method, out, density=0.5), RunOptions())
    got = load_file(str(out / "adapter_model.safetensors"))
    module = "model.layers.1.self_attn.q_proj"
    combine = getattr(merge_utils, method.removesuffix("_svd"))
    checkpoints = open_models(recipe_for(base, paths, method, out, density=0.5))
    found = [(WEIGHTS[n], checkpoints[n].adapter) for n in ("math", "code")]
    loras = [a.modules[f"{module}.weight"] for _, a in found]
    factors = [
        (a.weights.read(m.a), a.weights.read(m.b)) for (_, a), m in zip(found, loras, strict=True)
    ]
    torch.manual_seed(tensor_seed(3, f"{module}.weight"))
    if method.endswith("_svd"):
        deltas = [(b @ a) * m.scale for (a, b), m in zip(factors, loras, strict=True)]
        delta = combine(deltas, torch.tensor([w for w, _ in found]), 0.5)
        u, s, vh = torch.linalg.svd(delta, full_matrices=True)
        expected_b, expected_a = u[:, :4] @ torch.diag(s[:4]), vh[:4]
    else:
        scaled = [w * m.scale for (w, _), m in zip(found, loras, strict=True)]
        w_a = torch.tensor([abs(x) ** 0.5 * (1 if x >= 0 else -1) for x in scaled])
        w_b = torch.tensor([abs(x) ** 0.5 for x in scaled])
        expected_a = combine([a for a, _ in factors], w_a, 0.5)
        expected_b = combine([b for _, b in factors], w_b, 0.5)
    prefix = f"base_model.model.{module}"
    assert (got[f"{prefix}.lora_A.weight"] - expected_a).abs().max() <= 1e-5
    assert (got[f"{prefix}.lora_B.weight"] - expected_b).abs().max() <= 1e-5
    # the same recipe gives the same adapter; another seed another one
    again = tmp_path / "again"
    run(recipe_for(base, paths, method, again, density=0.5), RunOptions())
    assert all(
        torch.equal(t, load_file(str(again / "adapter_model.safetensors"))[n])
        for n, t in got.items()
    )


def test_plan_validate_and_refusals(tmp_path, adapters, cli):
    base, paths = adapters
    recipe = recipe_for(base, paths, "cat", tmp_path / "out")
    summary = plan(recipe)
    assert summary["output"] == "adapter" and summary["rank"] == 8 and summary["streaming"]
    assert summary["tensors"] == 2 * (4 * 2 + 1 + 2)  # q k v o (2 layers), embed, up (2 layers)
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict(
            {
                "models": {"math": {"path": str(base), "lora": str(paths["math"])}, "b": str(base)},
                "fuse": {
                    "method": "slerp",
                    "output": "adapter",
                    "base": "b",
                    "params": {"svd_rank": 0},
                },
                "save": {"path": str(tmp_path / "out")},
            }
        )
    text = str(caught.value)
    assert "fuse.method: 'slerp' is not an adapter combination" in text
    assert "fuse.base: an adapter-space merge has no base model" in text
    assert "fuse.params.svd_rank: Input should be greater than or equal to 1" in text
    with pytest.raises(RecipeError, match="fuse.params.density: required by the ties combination"):
        recipe_for(base, paths, "ties", tmp_path / "out")
    dora = build_adapter(base, tmp_path / "dora", seed=1, use_dora=True)
    with pytest.raises(PlanError, match="has DoRA magnitudes, which PEFT's adapter combinations"):
        run(recipe_for(base, {**paths, "code": dora}, "cat", tmp_path / "out"), RunOptions())
    assert not (tmp_path / "out").exists()


def test_cat_applies_the_weighted_sum_even_when_the_first_adapter_uses_rslora(tmp_path, adapters):
    from merge_cli.io.adapters import open_model
    from merge_cli.io.checkpoint import read_state_dict

    base, paths = adapters
    out = tmp_path / "out"
    run(recipe_for(base, paths, "cat", out, ("code", "math")), RunOptions())  # code: rsLoRA
    merged = read_state_dict(open_model(str(base), str(out)))
    plain = read_state_dict(open_model(str(base)))
    single = {n: read_state_dict(open_model(str(base), str(paths[n]))) for n in ("code", "math")}
    for name, tensor in plain.items():
        expected = tensor + sum(WEIGHTS[n] * (single[n][name] - tensor) for n in single)
        assert (merged[name] - expected).abs().max() <= 1e-5, name
