"""The ``merge-cli`` commands. With :mod:`merge_cli.cli.render`, the only code that prints
and picks exit codes.

Each command imports what it runs (the pipeline, and with it torch) when it runs, so that
``--help`` and a mistyped command answer at once.
"""

from __future__ import annotations

import gc
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from merge_cli.cli.allocator import tune_allocator
from merge_cli.cli.render import (
    RichProgress,
    console,
    guarded,
    human,
    print_envelope,
    print_evaluation,
    print_json,
    print_warnings,
)
from merge_cli.errors import MergeCliError, RecipeError
from merge_cli.version import __version__

app = typer.Typer(
    name="merge-cli",
    help="Deep model fusion from the command line: align, merge, connect and ensemble models "
    "from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
RecipeArg = Annotated[Path, typer.Argument(help="The recipe (YAML) to use.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value: KEY.PATH=VALUE (repeatable)."),
]
OutOpt = Annotated[str | None, typer.Option("--out", help="Output directory (sets save.path).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON only.")]
PushOpt = Annotated[
    str | None,
    typer.Option(
        "--push-to-hub",
        help="Upload the finished output to this Hub model repository, org/name "
        "(sets save.push_to_hub; the token comes from HF_TOKEN or `hf auth login`).",
    ),
]


@app.command()
def run(
    recipe: RecipeArg,
    set_: SetOpt = None,
    out: OutOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    device: Annotated[str, typer.Option(help="Compute device: cpu or cuda.")] = "cpu",
    chunk_mb: Annotated[
        int,
        typer.Option(help="Row-chunk budget per input tensor (MiB, float32).", min=1, max=4096),
    ] = 8,
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads for compute, every stage (default: all cores but one, at most 4, "
            "for streaming merges; torch's default for whole-model methods).",
            min=1,
            max=1024,
        ),
    ] = None,
    allow_nonfinite: Annotated[
        bool,
        typer.Option(help="Write the output even if merged tensors hold NaN or infinite values."),
    ] = False,
    push_to_hub: PushOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a recipe: load, (align), fuse, save, (evaluate), (upload)."""
    from merge_cli.config import load_recipe
    from merge_cli.options import RunOptions
    from merge_cli.pipeline import run as run_pipeline
    from merge_cli.save import REPORT_FILE

    # What is imported by now (torch, pydantic, ...) lives as long as the process: kept out
    # of the garbage collector's full passes, which otherwise traverse it again and again
    # while a merge allocates (docs/performance-notes.md).
    gc.freeze()

    warnings: list[str] = []

    def action() -> Any:
        parsed = load_recipe(recipe, set_, out, push_to_hub)
        warnings.extend(parsed.origin.warnings)
        if not as_json:
            print_warnings(warnings)
        _check_device(device)
        options = RunOptions(
            device=device,
            overwrite=overwrite,
            chunk_bytes=chunk_mb * 2**20,
            progress=RichProgress(not as_json),
            threads=threads,
            protected=(recipe,),
            allow_nonfinite=allow_nonfinite,
        )
        return run_pipeline(parsed, options)

    result = guarded(as_json, action, "run")
    payload = {
        "output": str(result.output) if result.output else None,
        "seconds": round(result.seconds, 3),
        "plan": result.plan,
        "evaluation": result.evaluation,
        "report": result.report,
        "commit_url": result.commit_url,
        "warnings": warnings,
    }
    if as_json:
        print_envelope("run", payload)
        return
    if result.output:
        console.print(
            f"[green]✓[/green] wrote [bold]{result.output}[/bold] in {result.seconds:.1f} s"
        )
    if result.plan:
        console.print(
            f"  {result.plan['tensors']} tensors, {human(result.plan['bytes_written'])} in "
            f"{len(result.plan['shards'])} shard(s); read {human(result.plan['bytes_read'])}"
        )
    if result.report and result.output:
        console.print(f"  report: {result.output / REPORT_FILE}")
    if result.evaluation:
        print_evaluation(result.evaluation)
    if result.commit_url:
        console.print(f"[green]✓[/green] uploaded: {result.commit_url}")


@app.command("eval")
def eval_(
    recipe: RecipeArg,
    set_: SetOpt = None,
    merged: Annotated[
        str | None,
        typer.Option(
            help="The fused model to score as `merged` (default: save.path if it exists)."
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            help="Where to write the JSON report (plots go beside it). Default: beside "
            "--merged or in save.path when it exists, else no files are written."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="Compute device: cpu or cuda.")] = "cpu",
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for torch (default: torch's).", min=1)
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a recipe's evaluate stage alone, on existing checkpoints (no fuse)."""
    from merge_cli.config import load_recipe
    from merge_cli.options import RunOptions
    from merge_cli.pipeline import run_evaluation

    def action() -> Any:
        parsed = load_recipe(recipe, set_, merged)
        if not parsed.evaluate:
            raise RecipeError(str(recipe), ["evaluate: the recipe has no evaluate entries"])
        _check_device(device)
        options = RunOptions(device=device, progress=RichProgress(not as_json), threads=threads)
        return run_evaluation(parsed, options, merged, report)

    rows, written = guarded(as_json, action, "eval")
    if as_json:
        print_envelope("eval", {"report": str(written) if written else None, "evaluation": rows})
        return
    print_evaluation(rows)


def _check_device(device: str) -> None:
    import torch

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise MergeCliError(f"--device: expected cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeCliError(
            "--device cuda: no CUDA device is available (torch.cuda.is_available() is False)"
        )


@app.command()
def validate(
    recipe: RecipeArg,
    set_: SetOpt = None,
    out: OutOpt = None,
    push_to_hub: PushOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a recipe and its inputs' headers without reading any tensor data."""
    from merge_cli.config import load_recipe
    from merge_cli.pipeline import check

    def action() -> Any:
        parsed = load_recipe(recipe, set_, out, push_to_hub, require_output=False)
        check(parsed, protected=(recipe,))
        return parsed

    parsed = guarded(as_json, action, "validate")
    if as_json:
        print_envelope(
            "validate", {"models": list(parsed.models), "warnings": parsed.origin.warnings}
        )
    else:
        print_warnings(parsed.origin.warnings)
        console.print(f"[green]✓[/green] {recipe} is valid ({len(parsed.models)} models)")


@app.command()
def plan(
    recipe: RecipeArg, set_: SetOpt = None, out: OutOpt = None, as_json: JsonOpt = False
) -> None:
    """Show what a run will read and write, and the peak memory it expects."""
    from merge_cli.config import load_recipe
    from merge_cli.pipeline import plan as plan_run

    def action() -> Any:
        parsed = load_recipe(recipe, set_, out, require_output=False)
        return {**plan_run(parsed), "warnings": parsed.origin.warnings}

    summary = guarded(as_json, action, "plan")
    if as_json:
        print_envelope("plan", summary)
        return
    print_warnings(summary["warnings"])
    console.print(f"stages: {' → '.join(summary['stages'])}")
    if "bytes_read" not in summary:
        if "note" in summary:
            console.print(summary["note"])
        if "cache_bytes" in summary:
            console.print(f"statistics caches need ≈ {human(summary['cache_bytes'])} on disk")
        return
    console.print(
        f"method [bold]{summary['method']}[/bold] on {', '.join(summary['models'])}"
        + (f" (base {summary['base']})" if summary["base"] else "")
    )
    console.print(
        f"{summary['tensors']} tensors ({summary['merged_tensors']} merged, "
        f"{summary['copied_tensors']} copied); read {human(summary['bytes_read'])}, "
        f"write {human(summary['bytes_written'])}; expected peak memory "
        f"≈ {human(summary['expected_peak_memory'])}"
    )
    table = Table("shard", "tensors", "size")
    for shard in summary["shards"]:
        table.add_row(shard["file"], str(shard["tensors"]), human(shard["bytes"]))
    console.print(table)


@app.command()
def convert(
    config: Annotated[Path, typer.Argument(help="A mergekit configuration (YAML).")],
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the recipe v1 equivalent of a mergekit configuration."""
    import yaml

    from merge_cli.config import convert_mergekit

    raw, warnings = guarded(as_json, lambda: convert_mergekit(config, out), "convert")
    print_warnings(warnings)  # stderr: stdout stays the recipe
    if as_json:
        print_json(raw)
        return
    print(f"# merge-cli recipe converted from the mergekit configuration {config}")
    print(yaml.safe_dump(raw, sort_keys=False, default_flow_style=None), end="")


@app.command()
def methods(as_json: JsonOpt = False) -> None:
    """List every fusion method and its parameters."""
    from merge_cli.engine.params import stage_params
    from merge_cli.fuse import METHODS

    entries = []
    for method in METHODS.values():
        params = []
        schemas = [("method", method.params), ("per model", method.model_params)]
        schemas += [("method", schema) for schema in stage_params(method)]
        for scope, schema in schemas:
            for name, field in schema.model_fields.items():
                default = (
                    None if field.is_required() else field.get_default(call_default_factory=True)
                )
                params.append(
                    {
                        "name": name,
                        "scope": scope,
                        "type": _type_name(field.annotation),
                        "default": default,
                        "description": field.description or "",
                        "choices": _choices(field.annotation),
                    }
                )
        entries.append(
            {
                "name": method.name,
                "family": method.family,
                "summary": method.summary,
                "reference": method.reference,
                "needs_base": method.needs_base,
                "streaming": method.streaming,
                "params": params,
            }
        )
    entries += _aligner_entries()
    if as_json:
        print_envelope("methods", {"methods": entries})
        return
    for entry in entries:
        console.print(
            f"[bold cyan]{entry['name']}[/bold cyan] ({entry['family'].replace('_', ' ')}"
            f"{', needs base' if entry['needs_base'] else ''}"
            f"{'' if entry['streaming'] else ', whole-model'}): {entry['summary']}"
        )
        console.print(f"  [dim]{entry['reference']}[/dim]")
        for p in entry["params"]:
            choices = p.get("choices")
            console.print(
                f"  • {p['name']} ({p['scope']}, {p['type']}, default {p['default']!r}"
                + (f"; one of {', '.join(map(repr, choices))}" if choices else "")
                + f"): {p['description']}",
                highlight=False,
            )


def _aligner_entries() -> list[dict[str, Any]]:
    """``align.method`` choices, listed like fuse methods (family "alignment")."""
    from merge_cli.align import ALIGNERS

    return [
        {
            "name": aligner.name,
            "family": "alignment",
            "summary": aligner.summary,
            "reference": aligner.reference,
            "needs_base": False,
            "streaming": True,
            "params": [
                {
                    "name": name,
                    "scope": "align",
                    "type": _type_name(field.annotation),
                    "default": field.get_default(call_default_factory=True),
                    "description": field.description or "",
                    "choices": _choices(field.annotation),
                }
                for name, field in aligner.params.model_fields.items()
            ],
        }
        for aligner in ALIGNERS.values()
    ]


def _choices(annotation: Any) -> list[Any] | None:
    """The values a ``Literal`` parameter takes (``None`` inside ``X | None`` included)."""
    args = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = list(typing.get_args(annotation))
    literals = [a for a in args if typing.get_origin(a) is typing.Literal]
    if not literals:
        return None
    values = [v for a in literals for v in typing.get_args(a)]
    return values + ([None] if type(None) in args else [])


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


@app.command()
def inspect(
    checkpoint: Annotated[
        str, typer.Argument(help="A checkpoint: directory, file or hf://org/name@rev.")
    ],
    as_json: JsonOpt = False,
    limit: Annotated[int, typer.Option(help="Show at most this many tensors (0: all).")] = 40,
) -> None:
    """Show a checkpoint's tensors, dtypes, shards and sizes."""
    from merge_cli.io.checkpoint import SafetensorsCheckpoint
    from merge_cli.io.dtypes import dtype_name
    from merge_cli.io.resolve import open_checkpoint

    ckpt = guarded(as_json, lambda: open_checkpoint(checkpoint), "inspect")
    names = ckpt.tensor_names()
    infos = [ckpt.info(n) for n in names]
    shard_of = (
        (lambda n: ckpt.file_of(n).name)
        if isinstance(ckpt, SafetensorsCheckpoint)
        else (lambda n: "")
    )
    total = sum(i.nbytes for i in infos)
    params = sum(i.numel for i in infos)
    dtypes: dict[str, int] = {}
    for info in infos:
        dtypes[dtype_name(info.dtype)] = dtypes.get(dtype_name(info.dtype), 0) + info.numel
    shards = sorted({shard_of(n) for n in names} - {""})
    if as_json:
        print_envelope(
            "inspect",
            {
                "source": ckpt.source,
                "tensors": len(names),
                "parameters": params,
                "bytes": total,
                "dtypes": dtypes,
                "shards": shards,
                "tensor_list": [
                    {
                        "name": i.name,
                        "shape": list(i.shape),
                        "dtype": dtype_name(i.dtype),
                        "bytes": i.nbytes,
                        "shard": shard_of(i.name),
                    }
                    for i in infos
                ],
            },
        )
        return
    console.print(
        f"[bold]{ckpt.source}[/bold]: {len(names)} tensors, {params:,} parameters, "
        f"{human(total)} in {max(1, len(shards))} file(s); dtypes: "
        + ", ".join(f"{k} ({v:,})" for k, v in dtypes.items())
    )
    table = Table("shape", "dtype", "size", "shard")
    table.columns.insert(0, Column("tensor", overflow="fold"))
    shown = infos if limit == 0 else infos[:limit]
    for info in shown:
        table.add_row(
            info.name,
            "×".join(map(str, info.shape)) or "scalar",
            dtype_name(info.dtype),
            human(info.nbytes),
            shard_of(info.name),
        )
    console.print(table)
    if len(shown) < len(infos):
        console.print(f"[dim]... {len(infos) - len(shown)} more (use --limit 0 for all)[/dim]")


@app.command()
def diff(
    a: Annotated[str, typer.Argument(help="First checkpoint.")],
    b: Annotated[str, typer.Argument(help="Second checkpoint.")],
    as_json: JsonOpt = False,
    limit: Annotated[int, typer.Option(help="Show at most this many tensors (0: all).")] = 40,
) -> None:
    """Compare two checkpoints: per-tensor cosine similarity and relative L2 distance."""
    from merge_cli.evaluate.weight_diff import diff_checkpoints
    from merge_cli.io.resolve import open_checkpoint

    def action() -> Any:
        return diff_checkpoints(open_checkpoint(a), open_checkpoint(b), RichProgress(not as_json))

    rows = guarded(as_json, action, "diff")
    if as_json:
        print_envelope("diff", {"rows": [row.as_dict() for row in rows]})
        return
    table = Table("shape", "cosine", "relative L2", "max |a-b|")
    table.columns.insert(0, Column("tensor", overflow="fold"))
    shown = rows if limit == 0 else rows[:limit]
    for row in shown:
        table.add_row(
            row.name,
            "×".join(map(str, row.shape)) or "scalar",
            f"{row.cosine:.6f}",
            f"{row.relative_l2:.3e}",
            f"{row.max_abs:.3e}",
        )
    console.print(table)
    if rows:
        mean_cos = sum(r.cosine for r in rows) / len(rows)
        console.print(
            f"{len(rows)} tensors; mean cosine {mean_cos:.6f}; "
            f"largest relative L2 {max(r.relative_l2 for r in rows):.3e}"
        )


@app.command("extract-lora")
def extract_lora(
    model: Annotated[str, typer.Argument(help="The fine-tuned (or merged) model.")],
    base: Annotated[str, typer.Option(help="The base model the adapter applies to.")],
    rank: Annotated[int, typer.Option(help="Largest rank per matrix.", min=1)],
    out: Annotated[Path, typer.Option(help="Directory to write the PEFT adapter to.")],
    sv_epsilon: Annotated[
        float,
        typer.Option(help="Drop singular values below this fraction of the largest (0: keep)."),
    ] = 0.0,
    embeddings: Annotated[
        bool,
        typer.Option(
            help="Decompose embedding matrices too (LoRA embedding pairs) instead of saving "
            "them whole (modules_to_save)."
        ),
    ] = False,
    device: Annotated[str, typer.Option(help="Compute device: cpu or cuda.")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    limit: Annotated[int, typer.Option(help="Show at most this many tensors (0: all).")] = 40,
    as_json: JsonOpt = False,
) -> None:
    """Extract a LoRA adapter (PEFT format): truncated SVD of MODEL - BASE per matrix."""
    from merge_cli.fuse.adapters.extract import ExtractOptions
    from merge_cli.fuse.adapters.extract import extract_lora as extract
    from merge_cli.io.resolve import open_checkpoint

    def action() -> Any:
        _check_device(device)
        options = ExtractOptions(
            rank=rank,
            sv_epsilon=sv_epsilon,
            embeddings=embeddings,
            device=device,
            overwrite=overwrite,
            progress=RichProgress(not as_json),
        )
        return extract(open_checkpoint(model), open_checkpoint(base), out, options, base)

    reports = guarded(as_json, action)
    if as_json:
        print_json({"ok": True, "output": str(out), "tensors": [vars(r) for r in reports]})
        return
    shown = [r for r in reports if r.kind != "unchanged"]
    table = Table("shape", "kept as", "rank", "retained energy", "relative error")
    table.columns.insert(0, Column("tensor", overflow="fold"))
    for report in shown if limit == 0 else shown[:limit]:
        table.add_row(
            report.name,
            "×".join(map(str, report.shape)),
            report.kind,
            str(report.rank) if report.rank else "",
            f"{report.energy:.6f}",
            f"{report.relative_error:.3e}",
        )
    console.print(table)
    pairs = [r for r in reports if r.kind in ("lora", "embedding")]
    console.print(
        f"[green]✓[/green] wrote [bold]{out}[/bold]: {len(pairs)} low-rank matrices, "
        f"{sum(r.kind == 'modules_to_save' for r in reports)} tensors kept whole, "
        f"{sum(r.kind == 'unchanged' for r in reports)} unchanged"
        + (f"; lowest retained energy {min(r.energy for r in pairs):.6f}" if pairs else "")
    )


def version_callback(value: bool) -> None:
    if value:
        console.print(f"merge-cli {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool | None,
        typer.Option(
            "--version", callback=version_callback, is_eager=True, help="Show the version and exit."
        ),
    ] = None,
) -> None:
    """Deep model fusion from the command line."""


def main() -> None:
    tune_allocator()
    app(prog_name="merge-cli")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
