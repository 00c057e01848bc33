"""The executor: compute threads, read-ahead, the background writer, passes for statistics."""

from __future__ import annotations

import os

import pytest
import torch

from merge_cli.engine import executor
from merge_cli.engine.executor import compute_threads
from merge_cli.engine.method import ChunkPasses
from merge_cli.errors import OutputError
from merge_cli.fuse import METHODS
from merge_cli.io.writer import ShardedWriter
from merge_cli.options import RunOptions
from merge_cli.pipeline import run
from tests.conftest import load_safetensors_dir
from tests.fuse.test_linear import linear_recipe


def test_compute_leaves_one_core_to_the_reads_and_takes_at_most_four(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert compute_threads(None) == 3
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert compute_threads(None) == 4
    assert compute_threads(12) == 12
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert compute_threads(None) == 1


def test_run_uses_the_requested_threads_and_restores_torchs(tiny_llamas, tmp_path, monkeypatch):
    seen = []
    original = executor._merge_unit

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(executor, "_merge_unit", spy)
    before = torch.get_num_threads()
    run(linear_recipe(tiny_llamas, tmp_path / "out"), RunOptions(threads=1))
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("write_queue", [1, 2, 64])
def test_background_writes_keep_order_at_any_queue_depth(
    tiny_llamas, tmp_path, monkeypatch, write_queue
):
    reference = run(linear_recipe(tiny_llamas, tmp_path / "reference"), RunOptions(chunk_bytes=512))
    monkeypatch.setattr(executor, "WRITE_QUEUE", write_queue)
    out = run(linear_recipe(tiny_llamas, tmp_path / "out"), RunOptions(chunk_bytes=512)).output
    assert (out / "model.safetensors").read_bytes() == (
        reference.output / "model.safetensors"
    ).read_bytes()
    assert load_safetensors_dir(out).keys() == load_safetensors_dir(reference.output).keys()


def test_a_failed_background_write_stops_the_run_and_leaves_nothing(
    tiny_llamas, tmp_path, monkeypatch
):
    writes = []
    original = ShardedWriter.write

    def failing(self, name, data):
        writes.append(name)
        if len(writes) == 5:
            raise OutputError("disk full while writing the output")
        original(self, name, data)

    monkeypatch.setattr(ShardedWriter, "write", failing)
    target = tmp_path / "out"
    with pytest.raises(OutputError, match="disk full"):
        run(linear_recipe(tiny_llamas, target), RunOptions(chunk_bytes=512))
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dir left


@pytest.mark.parametrize("method", ["ties", "dare_ties", "model_stock"])
def test_statistics_ahead_equal_statistics_in_line(tmp_path, monkeypatch, method):
    """Chunked tensors' statistics computed on the statistics thread, one tensor ahead, give
    the output computed without any background thread."""
    import functools

    from merge_cli import save
    from merge_cli.engine.executor import ExecutionOptions
    from tests.fuse.fuse_harness import merge, random_models

    shapes = {f"layers.{i}.weight": (6 + i, 5) for i in range(4)} | {"norm": (5,)}
    models = random_models(["base", "a", "b"], shapes)
    params = {"density": 0.5} if method != "model_stock" else {}
    threaded = merge(tmp_path, method, models, params=params, chunk_bytes=40)
    calls = []
    original = executor._Run.chunked_statistics

    def counted(self, tensor):
        calls.append(tensor.name)
        return original(self, tensor)

    monkeypatch.setattr(executor._Run, "chunked_statistics", counted)
    monkeypatch.setattr(
        save, "ExecutionOptions", functools.partial(ExecutionOptions, prefetch=False)
    )
    in_line = merge(tmp_path, method, models, params=params, chunk_bytes=40)
    assert threaded.keys() == in_line.keys()
    assert all(torch.equal(threaded[k], in_line[k]) for k in threaded)
    # without the thread, each chunked tensor's statistics pass runs once
    assert sorted(calls) == sorted(f"layers.{i}.weight" for i in range(4))


@pytest.mark.parametrize(
    "method, params",
    [
        ("ties", {"density": 0.5}),
        ("dare_ties", {"density": 0.5, "rescale": "l1"}),
        ("della", {"density": 0.5, "epsilon": 0.1, "rescale": "l1"}),
        ("model_stock", {}),
        ("model_stock", {"filter_wise": True}),  # its statistics stop at the first block
    ],
)
def test_kept_chunks_and_masks_are_read_and_drawn_once_and_change_nothing(
    tmp_path, monkeypatch, method, params
):
    """A chunked tensor small enough for the keep budget is read once (the statistics pass
    keeps its chunks for the merge) and DARE/DELLA draw its masks once; the output is the
    same as with nothing kept, and as with only the masks kept."""
    from merge_cli.fuse.tensorwise import dare, della
    from tests.fuse.fuse_harness import merge, random_models

    models = random_models(["base", "a", "b"], {"w": (40, 8), "norm": (8,)})
    reads: list[tuple[str, tuple[int, int]]] = []
    draws = []
    original_read, original_keep = executor._read, dare.random_keep

    def counted_read(checkpoints, source, unit):
        reads.append((source[0], unit.rows))
        return original_read(checkpoints, source, unit)

    def counted_keep(*args):
        draws.append(args[1])
        return original_keep(*args)

    monkeypatch.setattr(executor, "_read", counted_read)
    monkeypatch.setattr(dare, "random_keep", counted_keep)
    monkeypatch.setattr(della, "random_keep", counted_keep)
    outputs, counts = {}, {}
    # "w" is 10 chunks of 4 rows; its inputs take 3840 bytes and DARE's masks 640 bytes
    for budgets in (0, 12, 1000):  # keep nothing; only the masks; the chunks and the masks
        monkeypatch.setattr(executor, "KEPT_CHUNK_BUDGETS", budgets)
        reads.clear()
        draws.clear()
        outputs[budgets] = merge(tmp_path, method, models, params=params, chunk_bytes=128)
        chunk_reads = [entry for entry in reads if entry[1] != (0, 8)]  # not "norm"
        counts[budgets] = (len(chunk_reads), len(set(chunk_reads)), len(draws))
    for budgets in (12, 1000):
        assert all(torch.equal(outputs[budgets][k], outputs[0][k]) for k in outputs[0])
    # each chunk of each input is read once (a pass stopped early, as della's first and
    # model_stock's filter-wise, wastes the one chunk read ahead)
    assert counts[1000][1] == 30 and counts[1000][0] <= 33
    assert counts[0][0] > 30 and counts[12][0] == counts[0][0]
    if method in ("dare_ties", "della"):
        # the merge draws nothing: 10 chunks of "w" and "norm" once, for 2 models
        assert counts[12][2] == counts[1000][2] == counts[0][2] - 22


def _unstarted(shape: tuple[int, ...]) -> ChunkPasses:
    def start():
        raise AssertionError("a pass was started (a chunk read) to learn the shape")

    return ChunkPasses(shape, False, start)


@pytest.mark.parametrize(
    ("name", "method_params", "model_params"),
    [
        ("della", {"rescale": True}, {"density": 0.5, "epsilon": 0.1}),
        ("nuslerp", {"nuslerp_flatten": False}, {"weight": 0.5}),
    ],
)
def test_statistics_that_need_no_pass_read_nothing(name, method_params, model_params):
    entry = METHODS[name]
    models = [entry.model_params(**model_params)] * 2
    assert entry.statistics(_unstarted((64, 32)), entry.params(**method_params), models) is None
