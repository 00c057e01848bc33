"""The ``merge-cli`` command line. The only module that prints and picks exit codes."""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Column, Table

from merge_cli import __version__
from merge_cli.errors import MergeCliError

app = typer.Typer(
    name="merge-cli",
    help="Deep model fusion from the command line: align, merge, connect and ensemble models "
    "from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)

RecipeArg = Annotated[Path, typer.Argument(help="The recipe (YAML) to use.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value: KEY.PATH=VALUE (repeatable)."),
]
OutOpt = Annotated[str | None, typer.Option("--out", help="Output directory (sets save.path).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON only.")]


class RichProgress:
    """Renders library progress events as rich progress bars (on stderr)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar: Progress | None = None
        self._task: Any = None

    def start(self, description: str, total: int | None, unit: str = "bytes") -> None:
        if not self.enabled:
            return
        self.finish()
        columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn()]
        if unit == "bytes":
            columns += [DownloadColumn(), TransferSpeedColumn()]
        else:
            columns += [TextColumn("{task.completed}/{task.total} " + unit)]
        columns += [TimeElapsedColumn(), TimeRemainingColumn()]
        self._bar = Progress(*columns, console=errors, transient=False)
        self._bar.start()
        self._task = self._bar.add_task(description, total=total)

    def advance(self, amount: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, amount)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def note(self, text: str) -> None:
        if self.enabled:
            errors.print(f"[dim]{text}[/dim]")


def _fail(error: MergeCliError, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": False, "error": str(error), "kind": type(error).__name__}))
    else:
        errors.print(f"[bold red]error:[/bold red] {error}", highlight=False, markup=True)
    raise typer.Exit(error.exit_code)


def _guarded(as_json: bool, action: Callable[[], Any]) -> Any:
    try:
        return action()
    except MergeCliError as error:
        _fail(error, as_json)
    except KeyboardInterrupt:
        errors.print("[bold red]interrupted[/bold red]: nothing was written at the output path")
        raise typer.Exit(130) from None


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


@app.command()
def run(
    recipe: RecipeArg,
    set_: SetOpt = None,
    out: OutOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    device: Annotated[str, typer.Option(help="Compute device: cpu or cuda.")] = "cpu",
    chunk_mb: Annotated[
        int, typer.Option(help="Row-chunk budget per input tensor (MiB, float32).", min=1)
    ] = 8,
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads for compute (default: all cores but one, at most 4).", min=1
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a recipe: load, (align), fuse, save, (evaluate)."""
    from merge_cli.pipeline import REPORT_FILE, RunOptions
    from merge_cli.pipeline import run as run_pipeline
    from merge_cli.recipe import load_recipe

    # What is imported by now (torch, pydantic, ...) lives as long as the process: kept out
    # of the garbage collector's full passes, which otherwise traverse it again and again
    # while a merge allocates (7% of a linear merge's time).
    gc.freeze()

    def action() -> Any:
        parsed = load_recipe(recipe, set_, out)
        _check_device(device)
        options = RunOptions(
            device=device,
            overwrite=overwrite,
            chunk_bytes=chunk_mb * 2**20,
            progress=RichProgress(not as_json),
            threads=threads,
        )
        return run_pipeline(parsed, options)

    result = _guarded(as_json, action)
    payload = {
        "ok": True,
        "output": str(result.output) if result.output else None,
        "seconds": round(result.seconds, 3),
        "plan": result.plan,
        "evaluation": result.evaluation,
        "report": result.report,
    }
    if as_json:
        _print_json(payload)
        return
    if result.output:
        console.print(
            f"[green]✓[/green] wrote [bold]{result.output}[/bold] in {result.seconds:.1f} s"
        )
    if result.plan:
        console.print(
            f"  {result.plan['tensors']} tensors, {_human(result.plan['bytes_written'])} in "
            f"{len(result.plan['shards'])} shard(s); read {_human(result.plan['bytes_read'])}"
        )
    if result.report and result.output:
        console.print(f"  report: {result.output / REPORT_FILE}")
    if result.evaluation:
        _print_evaluation(result.evaluation)


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
        typer.Option(help="Where to write the JSON report (plots go beside it)."),
    ] = None,
    device: Annotated[str, typer.Option(help="Compute device: cpu or cuda.")] = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Run a recipe's evaluate stage alone, on existing checkpoints (no fuse)."""
    from merge_cli.errors import RecipeError
    from merge_cli.evaluate.stage import run_evaluation
    from merge_cli.pipeline import RunOptions
    from merge_cli.recipe import load_recipe

    def action() -> Any:
        parsed = load_recipe(recipe, set_, merged)
        if not parsed.evaluate:
            raise RecipeError(str(recipe), ["evaluate: the recipe has no evaluate entries"])
        _check_device(device)
        options = RunOptions(device=device, progress=RichProgress(not as_json))
        return run_evaluation(parsed, options, merged, report)

    rows, written = _guarded(as_json, action)
    if as_json:
        _print_json({"ok": True, "report": str(written), "evaluation": rows})
        return
    _print_evaluation(rows)


def _print_evaluation(rows: list[dict[str, Any]]) -> None:
    table = Table(title="evaluation")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    for key in keys:
        table.add_column(key)
    for row in rows:
        table.add_row(*[_cell(row.get(k)) for k in keys])
    console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _check_device(device: str) -> None:
    import torch

    from merge_cli.errors import MergeCliError as Error

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise Error(f"--device: expected cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Error(
            "--device cuda: no CUDA device is available (torch.cuda.is_available() is False)"
        )


@app.command()
def validate(
    recipe: RecipeArg, set_: SetOpt = None, out: OutOpt = None, as_json: JsonOpt = False
) -> None:
    """Check a recipe and its inputs' headers without reading any tensor data."""
    from merge_cli.pipeline import method_of, open_models, plan_merge, prepare_vocabulary
    from merge_cli.recipe import load_recipe

    def action() -> Any:
        parsed = load_recipe(recipe, set_, out)
        checkpoints, _ = prepare_vocabulary(parsed, open_models(parsed))
        if parsed.fuse is not None and method_of(parsed).streaming:
            plan_merge(parsed, checkpoints)
        return parsed

    parsed = _guarded(as_json, action)
    if as_json:
        _print_json({"ok": True, "models": list(parsed.models)})
    else:
        console.print(f"[green]✓[/green] {recipe} is valid ({len(parsed.models)} models)")


@app.command()
def plan(
    recipe: RecipeArg, set_: SetOpt = None, out: OutOpt = None, as_json: JsonOpt = False
) -> None:
    """Show what a run will read and write, and the peak memory it expects."""
    from merge_cli.pipeline import (
        method_of,
        open_models,
        plan_streaming,
        plan_summary,
        plan_whole_model,
        prepare_vocabulary,
    )
    from merge_cli.recipe import load_recipe

    def action() -> Any:
        parsed = load_recipe(recipe, set_, out)
        checkpoints, union = prepare_vocabulary(parsed, open_models(parsed))
        if parsed.fuse is None:
            return {"stages": _stages(parsed)}
        method = method_of(parsed)
        if not method.streaming:
            whole = plan_whole_model(parsed, checkpoints)
            return {"stages": _stages(parsed), "streaming": False, **whole}
        plan, _ = plan_streaming(parsed, checkpoints, union)
        summary = plan_summary(parsed, plan, checkpoints)
        return {"stages": _stages(parsed), "streaming": True, **summary}

    summary = _guarded(as_json, action)
    if as_json:
        _print_json(summary)
        return
    console.print(f"stages: {' → '.join(summary['stages'])}")
    if "bytes_read" not in summary:
        if "note" in summary:
            console.print(summary["note"])
        if "cache_bytes" in summary:
            console.print(f"statistics caches need ≈ {_human(summary['cache_bytes'])} on disk")
        return
    console.print(
        f"method [bold]{summary['method']}[/bold] on {', '.join(summary['models'])}"
        + (f" (base {summary['base']})" if summary["base"] else "")
    )
    console.print(
        f"{summary['tensors']} tensors ({summary['merged_tensors']} merged, "
        f"{summary['copied_tensors']} copied); read {_human(summary['bytes_read'])}, "
        f"write {_human(summary['bytes_written'])}; expected peak memory "
        f"≈ {_human(summary['expected_peak_memory'])}"
    )
    table = Table("shard", "tensors", "size")
    for shard in summary["shards"]:
        table.add_row(shard["file"], str(shard["tensors"]), _human(shard["bytes"]))
    console.print(table)


def _stages(recipe: Any) -> list[str]:
    stages = ["load"]
    if recipe.align:
        stages.append(f"align ({recipe.align.method})")
    if recipe.fuse:
        stages += [f"fuse ({recipe.fuse.method})", "save"]
    if recipe.evaluate:
        stages.append("evaluate")
    return stages


@app.command()
def convert(
    config: Annotated[Path, typer.Argument(help="A mergekit configuration (YAML).")],
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the recipe v1 equivalent of a mergekit configuration."""
    import yaml

    from merge_cli.mergekit import convert_mergekit

    raw = _guarded(as_json, lambda: convert_mergekit(config, out))
    if as_json:
        _print_json(raw)
        return
    print(f"# merge-cli recipe converted from the mergekit configuration {config}")
    print(yaml.safe_dump(raw, sort_keys=False, default_flow_style=None), end="")


@app.command()
def methods(as_json: JsonOpt = False) -> None:
    """List every fusion method and its parameters."""
    from merge_cli.fuse import METHODS

    entries = []
    for method in METHODS.values():
        params = []
        for scope, schema in (("method", method.params), ("per model", method.model_params)):
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
        _print_json(entries)
        return
    for entry in entries:
        console.print(
            f"[bold cyan]{entry['name']}[/bold cyan] ({entry['family'].replace('_', ' ')}"
            f"{', needs base' if entry['needs_base'] else ''}"
            f"{'' if entry['streaming'] else ', whole-model'}): {entry['summary']}"
        )
        console.print(f"  [dim]{entry['reference']}[/dim]")
        for p in entry["params"]:
            console.print(
                f"  • {p['name']} ({p['scope']}, {p['type']}, default {p['default']!r}): "
                f"{p['description']}",
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
                }
                for name, field in aligner.params.model_fields.items()
            ],
        }
        for aligner in ALIGNERS.values()
    ]


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

    ckpt = _guarded(as_json, lambda: open_checkpoint(checkpoint))
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
        _print_json(
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
            }
        )
        return
    console.print(
        f"[bold]{ckpt.source}[/bold]: {len(names)} tensors, {params:,} parameters, "
        f"{_human(total)} in {max(1, len(shards))} file(s); dtypes: "
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
            _human(info.nbytes),
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

    rows = _guarded(as_json, action)
    if as_json:
        _print_json([row.as_dict() for row in rows])
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


def _tune_allocator() -> None:
    """Keep freed tensor memory in the process for reuse (glibc only).

    The executor allocates and frees same-sized chunk buffers for every tensor. By default
    glibc returns allocations above 32 MB to the OS and maps them afresh each time, so every
    chunk pays for page faults on new memory (measured: 2.7x slower merging). Raising the
    mmap and trim thresholds lets freed chunks be reused; the peak resident set stays bounded
    by the chunks in flight. One arena for every thread: the reader allocates the chunks and
    the main thread frees them, and a thread's own arena (a few 64 MB heaps) gave its memory
    back and faulted it in again (a 3 x 6 GB linear merge: 729,000 page faults in the reader
    instead of 25,000, and 10% more time).
    """
    import ctypes
    import platform

    if platform.system() != "Linux":
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc; absent from musl
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, 1 << 31)
    mallopt(m_arena_max, 1)


def main() -> None:
    _tune_allocator()
    app(prog_name="merge-cli")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
