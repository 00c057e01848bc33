"""The streaming executor: runs a per-tensor method over a plan, tensor by tensor.

For each output tensor in plan order it reads the inputs on demand (in row chunks when the
tensor is larger than the chunk budget), computes in float32 on the chosen device (on CPU in
cache-sized row blocks), casts to the output dtype and hands the result to the writer.
Four threads overlap the work: the main one computes; a reader fetches the next unit; a
writer appends finished chunks (copied tensors go file to file); and, for methods with
whole-tensor statistics, a statistician runs the next large tensor's statistics pass, keeping
the chunks it read for the merge when they fit a budget (such a tensor is read once).
Peak memory depends on the chunk budget and the number of inputs, never on the model size.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from merge_cli.engine.method import ChunkPasses, TensorJob, TensorMethod
from merge_cli.engine.params import TensorParams, count_layers, layer_position, resolve_params
from merge_cli.engine.plan import MergePlan, OutputTensor, Source
from merge_cli.errors import MergeCliError, PlanError
from merge_cli.io.checkpoint import Checkpoint, FileRange
from merge_cli.io.quantized import quantize_fp8_block
from merge_cli.io.writer import ShardedWriter
from merge_cli.options import DEFAULT_CHUNK_BYTES
from merge_cli.progress import NullProgress, Progress
from merge_cli.recipe import FuseSpec

#: Rows of a chunk computed together, in float32 bytes (1 MiB, a core's L2 cache; see
#: compute_blocks).
COMPUTE_BLOCK_BYTES = 2**20
#: The most CPU threads compute gets unless ``--threads`` says otherwise (see compute_threads).
MAX_DEFAULT_THREADS = 4
#: Merged chunks queued for the writer thread before computing waits for it.
WRITE_QUEUE = 2
#: A chunked tensor whose inputs take at most this many chunk budgets (as stored) is read
#: once: its statistics pass keeps the chunks for the merge (see _Run.chunked_statistics).
#: A method's statistics may keep half as much again (TensorJob.keep_bytes).
KEPT_CHUNK_BUDGETS = 12


@dataclass(frozen=True)
class ExecutionOptions:
    device: str = "cpu"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    prefetch: bool = True
    #: torch's CPU threads for compute; None: all cores but one (at most 4; compute_threads).
    threads: int | None = None
    #: Write merged chunks holding NaN or infinite values instead of failing (--allow-nonfinite).
    allow_nonfinite: bool = False


def compute_threads(requested: int | None) -> int:
    """The number of CPU threads compute gets: ``requested``, or all cores but one, at most
    MAX_DEFAULT_THREADS.

    Reading the next chunk keeps one core busy copying from the page cache. Giving torch
    every core as well makes its worker threads wait on each other at every operation. More
    than a few threads do not pay either: each operation works on one cache-sized block,
    and the main and statistics threads each start a team of torch's threads for it. The
    measurements: docs/performance-notes.md.
    """
    if requested is not None:
        return requested
    return max(1, min(MAX_DEFAULT_THREADS, (os.cpu_count() or 1) - 1))


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``count`` for the block (``None``: left as they are).

    The pipeline applies ``--threads`` this way to every stage, so whole-model methods
    (AdaMerging's training steps, Fisher's per-example gradients), alignment and evaluation
    honour it as the streaming executor does."""
    if count is None:
        yield
        return
    with _torch_threads(count):
        yield


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that depends only on the recipe seed and the tensor name."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62


def row_chunks(
    shape: tuple[int, ...], chunk_bytes: int, chunkable: bool, row_block: int = 1
) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` that split a tensor into chunks within the budget, each
    a whole number of ``row_block`` rows (quantization scale blocks; at least one)."""
    if not shape:
        return [(0, 0)]
    rows = shape[0]
    row_bytes = 4 * max(1, int(torch.Size(shape[1:]).numel()))
    per_chunk = rows if not chunkable else max(1, chunk_bytes // row_bytes)
    if per_chunk < rows:
        per_chunk = max(row_block, per_chunk // row_block * row_block)
    return [(start, min(rows, start + per_chunk)) for start in range(0, max(rows, 1), per_chunk)]


@dataclass(frozen=True)
class _Unit:
    tensor: OutputTensor
    rows: tuple[int, int]
    whole: bool


def input_bytes(checkpoints: dict[str, Checkpoint], tensor: OutputTensor) -> int:
    """Bytes of a tensor's inputs as stored (:attr:`OutputTensor.sources`; a quantized
    input's data and scales, not its dequantized size)."""
    total = 0
    for model, name in tensor.sources:
        stored = getattr(checkpoints[model], "stored_bytes", None)
        total += stored(name) if stored is not None else checkpoints[model].info(name).nbytes
    return total


def keeps_inputs(
    method: TensorMethod, checkpoints: dict[str, Checkpoint], tensor: OutputTensor, chunk_bytes: int
) -> bool:
    """Whether the statistics pass over ``tensor`` keeps its chunks for the merge."""
    return (
        method.statistics is not None
        and tensor.copy_from is None
        and len(row_chunks(tensor.shape, chunk_bytes, method.chunkable, tensor.row_block)) > 1
        and input_bytes(checkpoints, tensor) <= KEPT_CHUNK_BUDGETS * chunk_bytes
    )


def _read(checkpoints: dict[str, Checkpoint], source: Source, unit: _Unit) -> torch.Tensor:
    model, name = source
    return checkpoints[model].read(name, None if unit.whole else unit.rows)


def _read_unit(checkpoints: dict[str, Checkpoint], unit: _Unit) -> list[torch.Tensor] | FileRange:
    """The unit's input tensors; for a copied tensor whose bytes a file holds as they are to
    be saved, just where they lie (the writer copies them file to file)."""
    tensor = unit.tensor
    if tensor.copy_from is not None:
        model, name = tensor.copy_from
        locate = getattr(checkpoints[model], "byte_range", None)
        if locate is not None:
            located = locate(name, None if unit.whole else unit.rows)
            if located.dtype == tensor.dtype:
                return located
    return [_read(checkpoints, source, unit) for source in tensor.sources]


def execute(
    plan: MergePlan,
    method: TensorMethod,
    spec: FuseSpec,
    checkpoints: dict[str, Checkpoint],
    writer: ShardedWriter,
    options: ExecutionOptions = ExecutionOptions(),
    progress: Progress | None = None,
) -> None:
    """Compute every tensor of ``plan`` and write it with ``writer``."""
    progress = progress or NullProgress()
    units = _units(plan, method, options)
    progress.start(f"merging with {method.name}", plan.bytes_written)
    with (
        _torch_threads(compute_threads(options.threads)),
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-cli-read") as reader,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-cli-stats") as statistician,
        _BackgroundWriter(writer, progress, options.prefetch) as output,
    ):
        run = _Run(
            plan,
            method,
            spec,
            checkpoints,
            torch.device(options.device),
            options,
            count_layers([t.name for t in plan.tensors]),
            reader,
            frozenset(
                t.name
                for t in plan.tensors
                if keeps_inputs(method, checkpoints, t, options.chunk_bytes)
            ),
        )
        ahead = _StatisticsAhead(run, units, statistician)
        quantizer = _Quantizer(plan, output)
        params: TensorParams | None = None  # the current tensor's, resolved at its first unit
        for index, (unit, raw) in enumerate(
            _prefetched(units, checkpoints, reader, options.prefetch, skip=run.kept)
        ):
            tensor = unit.tensor
            if isinstance(raw, FileRange):
                output.copy(tensor.name, raw)
                continue
            try:
                if tensor.copy_from is not None:
                    result = raw[0].to(tensor.dtype)
                elif not tensor.nbytes:  # a 0-sized tensor: nothing to merge
                    result = torch.empty(tensor.shape, dtype=tensor.dtype)
                else:
                    if unit.rows[0] == 0 or params is None:
                        params = run.params(tensor)
                    statistics = ahead.take(index)
                    if raw is None:  # kept by the statistics pass
                        raw = statistics.kept.pop(unit.rows)
                    result = _merge_unit(run, unit, raw, params, statistics)
            except MergeCliError:
                raise
            except (ValueError, RuntimeError) as error:
                raise PlanError(f"fuse ({method.name}): tensor {tensor.name!r}: {error}") from error
            if not options.allow_nonfinite:
                check_finite(tensor, unit.rows, result, raw, method.name)
            if tensor.quantize is not None:
                quantizer.write(unit, result)
            else:
                output.write(tensor.name, result)
    progress.finish()


@dataclass(frozen=True)
class _Run:
    """What every unit of one execution shares."""

    plan: MergePlan
    method: TensorMethod
    spec: FuseSpec
    checkpoints: dict[str, Checkpoint]
    device: torch.device
    options: ExecutionOptions
    num_layers: int
    reader: ThreadPoolExecutor
    #: tensors whose statistics pass keeps their chunks for the merge (:func:`keeps_inputs`)
    kept_tensors: frozenset[str]

    def kept(self, unit: _Unit) -> bool:
        """Whether the statistics pass over the unit's tensor keeps its chunks."""
        return not unit.whole and unit.tensor.name in self.kept_tensors

    def params(self, tensor: OutputTensor) -> TensorParams:
        position = layer_position(tensor.name, self.num_layers)
        return resolve_params(self.spec, self.method, self.plan.model_names, tensor.name, position)

    def to_job(
        self, tensor: OutputTensor, rows: tuple[int, int], inputs: list[torch.Tensor]
    ) -> TensorJob:
        if self.method.stored_dtype_inputs:
            values = [x.to(device=self.device) for x in inputs]
        else:
            # Jobs own their tensors (methods may work in place): copy when .to() would not.
            values = [
                x.to(device=self.device, dtype=torch.float32, copy=x.dtype == torch.float32)
                for x in inputs
            ]
        base = values.pop() if tensor.base is not None else None
        seed = tensor_seed(self.spec.seed, tensor.name)
        keep_bytes = KEPT_CHUNK_BUDGETS * self.options.chunk_bytes // 2
        return TensorJob(
            tensor.name, values, base, rows, tensor.shape, seed, tensor.dtype, keep_bytes
        )

    def block_jobs(
        self, tensor: OutputTensor, rows: tuple[int, int], inputs: list[torch.Tensor]
    ) -> Iterator[TensorJob]:
        """The jobs of a chunk's compute blocks (see :func:`compute_blocks`)."""
        # A method taking stored-dtype inputs blocks its own float32 work (see linear).
        splittable = (
            self.method.chunkable
            and self.device.type == "cpu"
            and not self.method.stored_dtype_inputs
        )
        blocks = compute_blocks(rows, tensor.shape, splittable)
        if len(blocks) == 1:
            yield self.to_job(tensor, rows, inputs)
            return
        for start, stop in blocks:
            offset = start - rows[0]
            part = [x[offset : offset + stop - start] for x in inputs]
            yield self.to_job(tensor, (start, stop), part)

    def chunked_statistics(self, tensor: OutputTensor) -> _TensorStatistics:
        """A chunked tensor's whole-tensor statistics, from passes over all its chunks.

        Each pass reads one chunk ahead and yields the same compute blocks that ``merge``
        will see, so statistics kept per block (TIES's ties before each block) line up.
        When the tensor's inputs are small enough (:func:`keeps_inputs`), the first pass
        keeps the chunks as read: later passes and the merge use them instead of reading
        the files again (a TinyLlama MLP matrix of three bf16 models is 69 MB).
        """
        assert self.method.statistics is not None
        rows = row_chunks(
            tensor.shape, self.options.chunk_bytes, self.method.chunkable, tensor.row_block
        )
        units = [_Unit(tensor, chunk, False) for chunk in rows]
        keep = tensor.name in self.kept_tensors
        kept: dict[tuple[int, int], list[torch.Tensor]] = {}

        def chunks() -> Iterator[tuple[tuple[int, int], list[torch.Tensor]]]:
            yield from list(kept.items())  # the chunks kept are always the first ones
            for unit, raw in _prefetched(
                units[len(kept) :], self.checkpoints, self.reader, self.options.prefetch
            ):
                assert isinstance(raw, list)  # only copied tensors are located
                if keep:
                    kept[unit.rows] = raw
                yield unit.rows, raw

        def passes() -> Iterator[TensorJob]:
            for chunk_rows, raw in chunks():
                yield from self.block_jobs(tensor, chunk_rows, raw)

        params = self.params(tensor)
        whole_tensor = ChunkPasses(tensor.shape, False, passes)  # several chunks
        value = self.method.statistics(whole_tensor, params.method, params.models)
        if keep:  # the passes may have stopped early: the merge needs every chunk
            for _ in chunks():
                pass
        return _TensorStatistics(value, kept)


@dataclass
class _TensorStatistics:
    """A chunked tensor's statistics and the chunks its pass kept (``rows -> inputs``)."""

    value: Any
    kept: dict[tuple[int, int], list[torch.Tensor]]


class _StatisticsAhead:
    """Computes chunked tensors' statistics on a thread of its own, ahead of the merge.

    A method with whole-tensor statistics passes over a large tensor twice (statistics,
    then merge). Computing the next tensors' statistics while the current one merges puts
    the second core to work: compute runs on one core, and reads rarely fill the other.
    While a tensor merges, the statistics of the next one and of those after it whose
    inputs, all together, take at most KEPT_CHUNK_BUDGETS chunk budgets are under way, so
    what they keep never exceeds what one more large tensor would (a layer's small
    attention matrices then no longer hold back its MLP's statistics).
    """

    def __init__(self, run: _Run, units: list[_Unit], pool: ThreadPoolExecutor):
        self.run = run
        self.units = units
        self.pool = pool if run.options.prefetch else None
        needs = run.method.statistics is not None
        #: index of a chunked tensor's first unit -> its position among such tensors
        self.positions: dict[int, int] = {}
        for index, unit in enumerate(units):
            if needs and not unit.whole and unit.rows[0] == 0 and unit.tensor.copy_from is None:
                self.positions[index] = len(self.positions)
        self.first_units = list(self.positions)
        self.futures: dict[str, Future] = {}

    def _submit(self, position: int) -> None:
        if self.pool is None or position >= len(self.first_units):
            return
        tensor = self.units[self.first_units[position]].tensor
        if tensor.name not in self.futures:
            self.futures[tensor.name] = self.pool.submit(self.run.chunked_statistics, tensor)

    def _submit_from(self, position: int) -> None:
        """Submit the statistics of the tensor at ``position`` and of the next ones."""
        self._submit(position)
        budget = KEPT_CHUNK_BUDGETS * self.run.options.chunk_bytes
        held = 0
        for ahead in range(position + 1, len(self.first_units)):
            tensor = self.units[self.first_units[ahead]].tensor
            held += input_bytes(self.run.checkpoints, tensor)
            if ahead > position + 1 and held > budget:
                break
            self._submit(ahead)

    def take(self, index: int) -> _TensorStatistics | None:
        """The statistics of unit ``index``'s tensor when it is chunked and the method has
        statistics (from a pass of their own), else None; submits the next tensor's."""
        unit = self.units[index]
        tensor = unit.tensor
        if unit.whole or self.run.method.statistics is None:
            return None
        if index in self.positions:
            self._submit_from(self.positions[index])
        future = self.futures.get(tensor.name)
        if future is None:  # no statistics thread: compute here, once per tensor
            future = Future()
            future.set_result(self.run.chunked_statistics(tensor))
            self.futures[tensor.name] = future
        if unit.rows[1] >= tensor.shape[0]:  # the tensor's last unit
            self.futures.pop(tensor.name)
        return future.result()


class _Quantizer:
    """Writes the chunks of tensors the plan stores as block-scaled FP8: each chunk (rows
    aligned to the blocks) quantized, and after the last one the tensor's scales."""

    def __init__(self, plan: MergePlan, output: _BackgroundWriter):
        self.output = output
        self.stored = {t.name: t for t in plan.tensors if t.quantize is not None}
        self.scales: list[torch.Tensor] = []

    def write(self, unit: _Unit, result: torch.Tensor) -> None:
        stored = self.stored[unit.tensor.name]
        assert stored.quantize is not None and stored.scale_name is not None
        fmt = "e5m2" if stored.dtype == torch.float8_e5m2 else "e4m3"
        data, scale = quantize_fp8_block(result.to(torch.float32), stored.quantize, fmt)
        self.output.write(stored.name, data)
        self.scales.append(scale)
        if unit.rows[1] >= stored.shape[0]:  # the tensor's last chunk
            self.output.write(stored.scale_name, torch.cat(self.scales))
            self.scales = []


class _BackgroundWriter:
    """Writes merged chunks in order on a thread of its own, at most WRITE_QUEUE behind.

    A write error surfaces at the next ``write`` or when the block ends.
    """

    def __init__(self, writer: ShardedWriter, progress: Progress, background: bool):
        self.writer = writer
        self.progress = progress
        self.pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-cli-write")
            if background
            else None
        )
        self.pending: list[Future] = []

    def _write(self, name: str, data: torch.Tensor) -> None:
        self.writer.write(name, data)
        self.progress.advance(data.numel() * data.element_size())

    def _copy(self, name: str, source: FileRange) -> None:
        self.writer.copy_range(name, source)
        self.progress.advance(source.nbytes)

    def write(self, name: str, data: torch.Tensor) -> None:
        self._submit(self._write, name, data)

    def copy(self, name: str, source: FileRange) -> None:
        self._submit(self._copy, name, source)

    def _submit(self, action: Callable[[str, Any], None], name: str, payload: Any) -> None:
        if self.pool is None:
            action(name, payload)
            return
        while len(self.pending) >= WRITE_QUEUE:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(action, name, payload))

    def __enter__(self) -> _BackgroundWriter:
        return self

    def __exit__(self, error_type: object, *_: object) -> None:
        if self.pool is None:
            return
        for future in self.pending if error_type is not None else []:
            future.cancel()
        self.pool.shutdown(wait=True)
        if error_type is None:
            for future in self.pending:
                future.result()


def check_finite(
    tensor: OutputTensor,
    rows: tuple[int, int],
    result: torch.Tensor,
    raw: list[torch.Tensor],
    method: str,
) -> None:
    """Refuse a merged chunk holding NaN or infinite values, naming the inputs that hold
    some (the usual cause) or else the method.

    The test is one reduction, ``aminmax``: NaN propagates to both ends and an infinity is
    an end, and unlike ``isfinite(...).all()`` it allocates nothing and is vectorised for
    bfloat16 (docs/performance-notes.md)."""
    if not result.is_floating_point() or not result.numel():
        return
    if bool(torch.isfinite(torch.stack(torch.aminmax(result))).all()):
        return
    bad = [
        name
        for (name, _), values in zip(tensor.sources, raw, strict=False)
        if values.is_floating_point() and not bool(torch.isfinite(values).all())
    ]
    cause = (
        f"the input {', '.join(dict.fromkeys(bad))} holds NaN or infinite values there"
        if bad
        else f"the method ({method}) produced them from finite inputs"
    )
    raise PlanError(
        f"tensor {tensor.name!r} (rows {rows[0]}-{rows[1]}): the merged values include NaN or "
        f"infinity; {cause}. Pass --allow-nonfinite to write them anyway"
    )


def _units(plan: MergePlan, method: TensorMethod, options: ExecutionOptions) -> list[_Unit]:
    """The plan's tensors in row chunks. A tensor written quantized is computed in float32
    (and quantized by :class:`_Quantizer`); its scale tensor is no unit of its own."""
    units = []
    for tensor in plan.tensors:
        if tensor.scale_of is not None:
            continue
        if tensor.quantize is not None:
            tensor = replace(tensor, dtype=torch.float32)
        chunks = row_chunks(
            tensor.shape,
            options.chunk_bytes,
            method.chunkable or tensor.copy_from is not None,
            tensor.row_block,
        )
        whole = len(chunks) == 1
        units += [_Unit(tensor, rows, whole) for rows in chunks]
    return units


def _prefetched(
    units: list[_Unit],
    checkpoints: dict[str, Checkpoint],
    pool: ThreadPoolExecutor,
    prefetch: bool,
    skip: Callable[[_Unit], bool] = lambda _unit: False,
) -> Iterator[tuple[_Unit, list[torch.Tensor] | FileRange | None]]:
    """Yield each unit with its raw input tensors, reading the next one in the background;
    units that ``skip`` names are yielded with None, unread."""

    def read(unit: _Unit) -> Future:
        skipped = skip(unit)
        if prefetch and not skipped:
            return pool.submit(_read_unit, checkpoints, unit)
        done: Future = Future()
        done.set_result(None if skipped else _read_unit(checkpoints, unit))
        return done

    if not prefetch:
        for unit in units:
            yield unit, read(unit).result()
        return
    pending: Future | None = None
    for i, unit in enumerate(units):
        current = pending or read(unit)
        pending = read(units[i + 1]) if i + 1 < len(units) else None
        yield unit, current.result()


def _merge_unit(
    run: _Run,
    unit: _Unit,
    raw: list[torch.Tensor],
    params: TensorParams,
    chunked_statistics: _TensorStatistics | None,
) -> torch.Tensor:
    """Merge one unit (a whole tensor or a row chunk of it) block by block; a chunk of a
    tensor with statistics comes with them."""
    tensor = unit.tensor
    method = run.method
    stats = None
    jobs: Iterable[TensorJob] | None = None
    if method.statistics is not None:
        if unit.whole:
            # Statistics never modify a job: the merge reuses the converted blocks.
            jobs = list(run.block_jobs(tensor, unit.rows, raw))
            stats = method.statistics(ChunkPasses.over(jobs), params.method, params.models)
        else:
            assert chunked_statistics is not None
            stats = chunked_statistics.value
    first = unit.rows[0]
    out = None
    for job in jobs if jobs is not None else run.block_jobs(tensor, unit.rows, raw):
        merged = method.merge(job, params.method, params.models, stats)
        if job.rows == unit.rows:
            return merged.to(tensor.dtype).cpu()
        if out is None:
            out = torch.empty((unit.rows[1] - first, *tensor.shape[1:]), dtype=tensor.dtype)
        out[job.rows[0] - first : job.rows[1] - first].copy_(merged)
    assert out is not None
    return out


def compute_blocks(
    rows: tuple[int, int], shape: tuple[int, ...], splittable: bool
) -> list[tuple[int, int]]:
    """Row ranges of at most COMPUTE_BLOCK_BYTES (float32) that cover a chunk's ``rows``.

    A chunk is read whole but computed block by block, so that its float32 copies and a
    method's temporaries stay in the CPU's cache instead of streaming through memory for
    every operation (docs/performance-notes.md). Results
    do not change: a method gives the same rows whatever range it is handed. Off the CPU a
    chunk is one block (a GPU wants large kernels).
    """
    if not splittable or not shape:
        return [rows]
    start, stop = rows
    blocks = row_chunks((stop - start, *shape[1:]), COMPUTE_BLOCK_BYTES, chunkable=True)
    return [(start + first, start + last) for first, last in blocks]
