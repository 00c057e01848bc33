"""The executor's threads: compute threads, read-ahead and the background writer."""

from __future__ import annotations

import os

import pytest
import torch

from merge_cli.errors import OutputError
from merge_cli.fuse import executor
from merge_cli.fuse.executor import compute_threads
from merge_cli.io.writer import ShardedWriter
from merge_cli.pipeline import RunOptions, run
from tests.conftest import load_safetensors_dir
from tests.fuse.test_linear import linear_recipe


def test_compute_leaves_one_core_to_the_reads(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert compute_threads(None) == 7
    assert compute_threads(3) == 3
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

    from merge_cli import pipeline
    from merge_cli.fuse.executor import ExecutionOptions
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
        pipeline, "ExecutionOptions", functools.partial(ExecutionOptions, prefetch=False)
    )
    in_line = merge(tmp_path, method, models, params=params, chunk_bytes=40)
    assert threaded.keys() == in_line.keys()
    assert all(torch.equal(threaded[k], in_line[k]) for k in threaded)
    # without the thread, each chunked tensor's statistics pass runs once
    assert sorted(calls) == sorted(f"layers.{i}.weight" for i in range(4))
