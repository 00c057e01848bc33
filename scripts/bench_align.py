"""Alignment at LLM scale: peak RSS and solver time of weight matching on Llama checkpoints.

Writes a synthetic Llama-shaped bf16 checkpoint (hidden 2048, intermediate 5632, 32 query
heads, 4 KV heads: grouped-query attention; the layer count sets the size), and a second one
that is a randomly permuted copy (MLP neurons, KV heads, query heads within their KV head)
plus independent noise. Then, each under ``/usr/bin/time -v`` in a fresh process:

* ``merge-cli run`` with ``fuse: linear`` only (the streaming baseline), and
* the same recipe with ``align: {method: weight_matching, spec: llama}``.

Prints peak RSS, wall time, the solver time the align stage reports, and how far the aligned
average is from the reference (the noise only, if the permutation was recovered).

    python scripts/bench_align.py --size-gb 1.2 --root /tmp/bench-align   # deletes it after
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from merge_cli.align.spec import llama_spec, permute_state_dict, random_permutations
from merge_cli.io import InMemoryCheckpoint, open_checkpoint

HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 32, 4
HEAD_DIM = HIDDEN // HEADS
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "vocab_size": VOCAB,
    "torch_dtype": "bfloat16",
}


def layer_state(prefix: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    shapes = {
        "input_layernorm.weight": (HIDDEN,),
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "post_attention_layernorm.weight": (HIDDEN,),
        "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
    }
    return {
        prefix + name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        for name, shape in shapes.items()
    }


def generate(root: Path, layers: int, noise: float, seed: int = 0) -> tuple[Path, Path]:
    """The reference and its permuted, noisy copy; written one layer (one shard) at a time."""
    reference, permuted = root / "reference", root / "permuted"
    config = dict(CONFIG, num_hidden_layers=layers)
    generator = torch.Generator().manual_seed(seed)
    maps: dict[Path, dict[str, str]] = {reference: {}, permuted: {}}
    for directory in maps:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(config))
    parts = [("outer.0", {"model.embed_tokens.weight": (VOCAB, HIDDEN)})]
    parts += [(f"layer.{i}", i) for i in range(layers)]
    parts += [("outer.1", {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})]
    for index, (label, what) in enumerate(parts):
        if isinstance(what, int):
            state = layer_state(f"model.layers.{what}.", generator)
            spec = llama_spec(InMemoryCheckpoint(state), config)
            other = permute_state_dict(state, spec, random_permutations(spec, seed=index))
            other = {
                k: (
                    v.float() + noise * v.float().std() * torch.randn(v.shape, generator=generator)
                ).to(torch.bfloat16)
                for k, v in other.items()
            }
        else:
            state = {
                k: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16)
                for k, s in what.items()
            }
            other = state
        file_name = f"model-{index + 1:05d}-of-{len(parts):05d}.safetensors"
        for directory, tensors in ((reference, state), (permuted, other)):
            save_file(tensors, str(directory / file_name), metadata={"format": "pt"})
            maps[directory].update({name: file_name for name in tensors})
        print(f"  wrote {label}", file=sys.stderr)
    for directory, weight_map in maps.items():
        index_file = {"metadata": {}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index_file))
    return reference, permuted


def timed_run(recipe: dict, root: Path, name: str) -> dict:
    path = root / f"{name}.json"
    path.write_text(json.dumps(recipe))
    command = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "merge_cli",
        "run",
        str(path),
        "--overwrite",
    ]
    env = dict(os.environ, COLUMNS="500")  # one line per note from the rich console
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time.*: ([\d:.]+)", result.stderr).group(1)
    solver = re.findall(r"solver ([\d.]+) s, total ([\d.]+) s", result.stderr)
    return {"name": name, "peak_rss_mb": rss / 1024, "wall": wall, "solver": solver}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=10, help="10 layers: 1.14 GB per model")
    parser.add_argument("--noise", type=float, default=0.5, help="relative noise on the copy")
    parser.add_argument("--root", type=Path, default=Path("/tmp/bench-align"))
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = parser.parse_args()
    try:
        reference, permuted = generate(args.root, args.layers, args.noise)
        size = sum(p.stat().st_size for p in reference.glob("*.safetensors"))
        out = args.root / "out"
        recipe = {
            "models": {"ref": str(reference), "other": str(permuted)},
            "fuse": {"method": "linear", "models": ["ref", "other"]},
            "save": {"path": str(out), "dtype": "bfloat16", "model_card": False},
        }
        rows = [timed_run(recipe, args.root, "linear (no align)")]
        aligned = dict(
            recipe, align={"method": "weight_matching", "reference": "ref", "spec": "llama"}
        )
        rows.append(timed_run(aligned, args.root, "weight_matching + linear"))
        merged, ref = open_checkpoint(str(out)), open_checkpoint(str(reference))
        name = "model.layers.0.mlp.gate_proj.weight"
        distance = float((merged.read(name).float() - ref.read(name).float()).abs().mean())
        scale = float(ref.read(name).float().abs().mean())
        print(f"checkpoint size: {size / 1e9:.2f} GB per model, {args.layers} layers")
        for row in rows:
            solver = sum(float(s) for s, _ in row["solver"])
            total = sum(float(t) for _, t in row["solver"])
            print(
                f"{row['name']}: peak RSS {row['peak_rss_mb']:.0f} MB, wall {row['wall']}"
                + (
                    f", solver {solver:.1f} s (align incl. reads {total:.1f} s)"
                    if row["solver"]
                    else ""
                )
            )
        print(
            f"aligned average vs reference, {name}: mean |diff| {distance:.5f} "
            f"(mean |w| {scale:.5f})"
        )
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
