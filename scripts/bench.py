"""Benchmark: wall time, peak RSS and input throughput of a streaming merge.

Generates synthetic Llama-shaped sharded bf16 checkpoints (hidden 2048, intermediate 5632,
vocab 32000, GQA with 4 KV heads; the number of layers sets the size), then for each size:

* the baseline — one process that reads every input byte once and writes as many bytes as
  the merged output — and
* ``merge-cli run`` on a recipe merging three checkpoints,

each with a cold page cache (the inputs' pages evicted with POSIX_FADV_DONTNEED) and a warm
one. With ``--fp8`` the checkpoints are DeepSeek-V3-style FP8 instead: every linear projection
in the layers stored as float8_e4m3fn with one float32 ``weight_scale_inv`` per 128x128
block and a ``quantization_config`` (embeddings, norms and lm_head stay bf16); merge-cli
dequantizes them on read and writes bf16, so the output is about twice an input's size. The
size is then the FP8 checkpoint's. Peak RSS is the merge process's maximum resident set size
as GNU ``/usr/bin/time`` reports it, memory-mapped file pages included.

    python scripts/bench.py                         # 3 GB and 6 GB inputs, linear
    python scripts/bench.py --sizes 1 --methods linear ties dare_ties
    python scripts/bench.py --repeat 3              # medians of 3 runs of each, in turn
    python scripts/bench.py --fp8 --sizes 1.5 3     # FP8 block-scaled inputs, bf16 output
    python scripts/bench.py --sizes 1 2 --methods linear@lora ties@lora

A method written ``NAME@lora`` merges, instead of three checkpoints, the first one and two
LoRA adapters of it (rank 16 on every attention and MLP matrix, PEFT's layout), applied on
read: ``models.NAME: {path: BASE, lora: ADAPTER}``. The same bytes of checkpoint are read (the
base three times) plus the adapters', and each adapted tensor is computed as W + scale·B·A.

Peak RSS is the largest over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from merge_cli.io.quantized import quantize_fp8_block

HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 32, 4
KV_DIM = HIDDEN // HEADS * KV_HEADS
SHARD_BYTES = 2 * 10**9
FP8_BLOCK = (128, 128)
FP8_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "weight_block_size": list(FP8_BLOCK),
    "activation_scheme": "dynamic",
}


def is_fp8(name: str, shape: tuple[int, ...]) -> bool:
    """The tensors DeepSeek-V3 stores as FP8: linear projections inside the layers."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight") and len(shape) == 2


def stored_bytes(name: str, shape: tuple[int, ...], fp8: bool) -> int:
    """Bytes of a tensor as stored: bf16, or FP8 plus its float32 block scales."""
    numel = torch.Size(shape).numel()
    if not (fp8 and is_fp8(name, shape)):
        return numel * 2
    blocks = -(-shape[0] // FP8_BLOCK[0]) * -(-shape[1] // FP8_BLOCK[1])
    return numel + 4 * blocks


def layer_shapes(layer: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{layer}."
    return {
        p + "input_layernorm.weight": (HIDDEN,),
        p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        p + "self_attn.k_proj.weight": (KV_DIM, HIDDEN),
        p + "self_attn.v_proj.weight": (KV_DIM, HIDDEN),
        p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        p + "post_attention_layernorm.weight": (HIDDEN,),
        p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
        p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
    }


def model_shapes(num_layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for layer in range(num_layers):
        shapes.update(layer_shapes(layer))
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def layers_for(size_gb: float, fp8: bool = False) -> int:
    per_layer = sum(stored_bytes(n, s, fp8) for n, s in layer_shapes(0).items())
    outer = 2 * VOCAB * HIDDEN * 2
    return max(1, round((size_gb * 1e9 - outer) / per_layer))


def generate(directory: Path, num_layers: int, seed: int, fp8: bool = False) -> None:
    """One synthetic checkpoint; values are slices of a seeded random pool (fast to make).
    With ``fp8``, the layers' projections are quantized to FP8 with 128x128 block scales."""
    if (directory / "model.safetensors.index.json").exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    pool = (
        torch.randn(64 * 2**20, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        * 0.02
    )
    shapes = model_shapes(num_layers)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    offset = 0
    for name, shape in shapes.items():
        numel = torch.Size(shape).numel()
        nbytes = stored_bytes(name, shape, fp8)
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        start = offset % (pool.numel() - numel) if numel < pool.numel() else 0
        if numel <= pool.numel():
            tensor = pool[start : start + numel].reshape(shape).clone()
        else:
            tensor = pool.repeat(-(-numel // pool.numel()))[:numel].reshape(shape).clone()
        if fp8 and is_fp8(name, shape):
            data, scale = quantize_fp8_block(tensor.float(), FP8_BLOCK)
            shards[-1][name], shards[-1][name + "_scale_inv"] = data, scale
        else:
            shards[-1][name] = tensor
        size += nbytes
        offset += 7919 * 131
        if size >= SHARD_BYTES:
            pass
    weight_map = {}
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    total = sum(stored_bytes(n, s, fp8) for n, s in shapes.items())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "torch_dtype": "bfloat16",
    }
    if fp8:
        config["quantization_config"] = FP8_CONFIG
    (directory / "config.json").write_text(json.dumps(config, indent=2))


LORA_RANK = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def generate_adapter(directory: Path, num_layers: int, seed: int) -> None:
    """A synthetic PEFT LoRA adapter of :func:`generate`'s checkpoints (random A and B)."""
    if (directory / "adapter_model.safetensors").exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1000 + seed)
    tensors = {}
    for name, shape in model_shapes(num_layers).items():
        module = name.removesuffix(".weight")
        if len(shape) != 2 or not module.endswith(LORA_TARGETS):
            continue
        prefix = f"base_model.model.{module}"
        a = torch.randn(LORA_RANK, shape[1], generator=generator) * 0.01
        b = torch.randn(shape[0], LORA_RANK, generator=generator) * 0.01
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": LORA_RANK,
        "lora_alpha": 2 * LORA_RANK,
        "target_modules": list(LORA_TARGETS),
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (no root needed)."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[Path]) -> None:
    buffer = bytearray(16 * 2**20)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


BASELINE = """
import sys
inputs, output, nbytes = sys.argv[1:-2], sys.argv[-2], int(sys.argv[-1])
buffer = bytearray(16 * 2**20)
for path in inputs:
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass
with open(output, "wb", buffering=0) as handle:
    view = memoryview(buffer)
    while nbytes > 0:
        nbytes -= handle.write(view[: min(len(buffer), nbytes)])
"""


def timed(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a command, measured by GNU time.

    The command runs under ``/usr/bin/time`` rather than straight from this process: the
    maximum RSS the kernel reports for a process includes what it had before ``exec``, and a
    child forked straight from this benchmark would inherit the benchmark's own (large)
    resident set. Without GNU time, the child's rusage is used, with that floor.
    """
    if not Path("/usr/bin/time").exists():
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            assert child.stderr is not None
            raise SystemExit(f"command failed: {' '.join(command)}\n{child.stderr.read()}")
        return seconds, usage.ru_maxrss * 1024
    with tempfile.NamedTemporaryFile("r") as report:
        start = time.perf_counter()
        process = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", report.name, *command],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        seconds = time.perf_counter() - start
        if process.returncode != 0:
            raise SystemExit(f"command failed: {' '.join(command)}\n{process.stderr}")
        max_rss_kb = int(report.read().split()[-1])
    return seconds, max_rss_kb * 1024


def recipe_for(
    method: str, models: list[Path], out: Path, directory: Path, adapters: list[Path]
) -> Path:
    """The recipe of ``method`` on ``models``; ``NAME@lora``: on the first model and the
    adapters of it instead."""
    method, _, lora = method.partition("@")
    base, *rest = models
    sources: list = [str(p) for p in models]
    if lora:
        sources = [str(base), *({"path": str(base), "lora": str(a)} for a in adapters)]
    fuse: dict = {"method": method}
    if method == "linear":
        fuse["models"] = {f"m{i}": {"weight": 1.0} for i in range(len(models))}
        names = {f"m{i}": source for i, source in enumerate(sources)}
    else:
        names = {"base": sources[0], **{f"m{i}": p for i, p in enumerate(sources[1:])}}
        fuse["base"] = "base"
        fuse["models"] = {f"m{i}": {"weight": 0.5} for i in range(len(rest))}
        if method in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "della"):
            fuse["params"] = {"density": 0.5}
        if method in ("dare_ties", "dare_linear", "della"):
            # mergekit's rescaling, whose whole-tensor statistics pass holds the most memory
            fuse["params"]["rescale"] = "l1"
    recipe = {"models": names, "fuse": fuse, "save": {"path": str(out), "dtype": "bfloat16"}}
    path = directory / f"{method}{'-lora' if lora else ''}.json"  # JSON is YAML
    path.write_text(json.dumps(recipe))
    return path


def bench_size(
    size_gb: float,
    methods: list[str],
    root: Path,
    keep: bool,
    device: str,
    repeat: int,
    fp8: bool = False,
) -> list[dict]:
    num_layers = layers_for(size_gb, fp8)
    directory = root / f"llama-{'fp8-' if fp8 else ''}{size_gb:g}gb"
    models = [directory / name for name in ("a", "b", "c")]
    for seed, model in enumerate(models):
        generate(model, num_layers, seed, fp8)
    adapters = [directory / f"lora{i}" for i in range(2)]
    if any(m.endswith("@lora") for m in methods):
        for seed, adapter in enumerate(adapters):
            generate_adapter(adapter, num_layers, seed)
    inputs = sorted(p for m in models for p in m.glob("*.safetensors"))
    input_bytes = sum(p.stat().st_size for p in inputs)
    out = directory / "out"
    rows = []
    for method in methods:
        recipe = recipe_for(method, models, out, directory, adapters)
        merge_cmd = [
            sys.executable,
            "-m",
            "merge_cli",
            "run",
            str(recipe),
            "--overwrite",
            "--device",
            device,
            "--json",
        ]
        for cache in ("cold", "warm"):
            # the bf16 output (an FP8 input's weights take two bytes each once dequantized)
            output_bytes = sum(torch.Size(s).numel() * 2 for s in model_shapes(num_layers).values())
            baseline_out = directory / "baseline.bin"
            prepare = evict if cache == "cold" else warm
            base_runs, merge_runs, merge_rss = [], [], 0
            for _ in range(repeat):  # the two in turn, so drift on the machine hits both
                shutil.rmtree(out, ignore_errors=True)
                prepare(inputs)
                seconds, _ = timed(
                    [
                        sys.executable,
                        "-c",
                        BASELINE,
                        *map(str, inputs),
                        str(baseline_out),
                        str(output_bytes),
                    ]
                )
                base_runs.append(seconds)
                baseline_out.unlink()
                prepare(inputs)
                seconds, rss = timed(merge_cmd)
                merge_runs.append(seconds)
                merge_rss = max(merge_rss, rss)
            merge_s, base_s = statistics.median(merge_runs), statistics.median(base_runs)
            rows.append(
                {
                    "size_gb": round(input_bytes / 3 / 1e9, 2),
                    "layers": num_layers,
                    "method": method,
                    "inputs": "fp8" if fp8 else "bf16",
                    "cache": cache,
                    "merge_s": round(merge_s, 2),
                    "baseline_s": round(base_s, 2),
                    "ratio": round(merge_s / base_s, 2),
                    "peak_rss_mb": round(merge_rss / 2**20),
                    "input_gb_per_s": round(input_bytes / merge_s / 1e9, 2),
                    "runs_s": {
                        "merge": [round(x, 2) for x in merge_runs],
                        "baseline": [round(x, 2) for x in base_runs],
                    },
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(out, ignore_errors=True)
    if not keep:
        shutil.rmtree(directory)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[3.0, 6.0], help="GB per input")
    parser.add_argument("--methods", nargs="+", default=["linear"])
    parser.add_argument("--root", type=Path, default=Path("bench-data"))
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--device", default="cpu", help="merge-cli's --device (cpu or cuda)")
    parser.add_argument(
        "--fp8", action="store_true", help="FP8 block-scaled inputs (DeepSeek-V3 layout)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each, in turn (medians reported)"
    )
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        rows += bench_size(
            size, args.methods, args.root, args.keep, args.device, args.repeat, args.fp8
        )
    print()
    print(
        "| input size | inputs | method | cache | merge-cli | read+write baseline | ratio "
        "| peak RSS | input GB/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| 3 × {r['size_gb']} GB | {r['inputs']} | {r['method']} | {r['cache']} | "
            f"{r['merge_s']} s | "
            f"{r['baseline_s']} s | {r['ratio']}× | {r['peak_rss_mb']} MB | {r['input_gb_per_s']} |"
        )


if __name__ == "__main__":
    main()
