"""The streaming sharded writer: valid safetensors, index, atomic output, clear errors."""

from __future__ import annotations

import errno
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from merge_cli.errors import OutputError
from merge_cli.io.checkpoint import TensorInfo
from merge_cli.io.writer import ShardedWriter


def infos(tensors):
    return [TensorInfo(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


@pytest.fixture
def tensors():
    return {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.ones(5, dtype=torch.bfloat16),
        "c": torch.tensor(7),
        "d": torch.randn(2, 2).half(),
    }


def test_shards_and_index_load_with_safetensors(tmp_path, tensors):
    target = tmp_path / "out"
    items = list(tensors.items())
    shards = [infos(dict(items[:2])), infos(dict(items[2:]))]
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    with ShardedWriter(target, shards, names) as writer:
        writer.write("a", tensors["a"][:2])  # a chunk of rows, then the rest
        writer.write("a", tensors["a"][2:])
        for name in ("b", "c", "d"):
            writer.write(name, tensors[name])
        writer.finish()
    loaded = {**load_file(str(target / names[0])), **load_file(str(target / names[1]))}
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": names[0], "b": names[0], "c": names[1], "d": names[1]}
    assert index["metadata"]["total_size"] == 48 + 10 + 8 + 8
    assert not list(tmp_path.glob(".out.*"))


def test_failure_leaves_nothing_at_target(tmp_path, tensors):
    target = tmp_path / "out"
    with (
        pytest.raises(RuntimeError),
        ShardedWriter(target, [infos(tensors)], ["model.safetensors"]) as writer,
    ):
        writer.write("a", tensors["a"])
        raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path, tensors):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        ShardedWriter(target, [infos(tensors)], ["model.safetensors"])
    assert (target / "keep.txt").read_text() == "precious"
    with ShardedWriter(target, [infos(tensors)], ["model.safetensors"], overwrite=True) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        writer.finish()
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]


def test_disk_full_is_reported_and_cleaned_up(tmp_path, tensors, monkeypatch):
    target = tmp_path / "out"
    writer = ShardedWriter(target, [infos(tensors)], ["model.safetensors"])

    def full(_payload):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="the disk is full.*nothing was written at"), writer:
        writer.write("a", tensors["a"])
        monkeypatch.setattr(writer._handle, "write", full, raising=False)
        writer.write("b", tensors["b"])
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_shards_are_preallocated_to_their_final_size(tmp_path, tensors, monkeypatch):
    from merge_cli.io import writer as writer_module

    sizes = []
    original = writer_module.preallocate

    def spy(fd, size):
        original(fd, size)
        sizes.append((size, os.fstat(fd).st_size))

    monkeypatch.setattr(writer_module, "preallocate", spy)
    target = tmp_path / "out"
    with ShardedWriter(target, [infos(tensors)], ["model.safetensors"]) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        writer.finish()
    final = (target / "model.safetensors").stat().st_size
    assert sizes and sizes[0][0] == final
    if sys.platform.startswith("linux"):
        assert sizes[0][1] == final  # reserved up front, not grown by the writes
    assert load_file(target / "model.safetensors").keys() == tensors.keys()


def test_no_room_for_a_shard_fails_before_writing_it(tmp_path, tensors, monkeypatch):
    from merge_cli.io import writer as writer_module

    def no_room(_fd, _size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module, "preallocate", no_room)
    target = tmp_path / "out"
    with (
        pytest.raises(OutputError, match="model.safetensors: cannot write \\(the disk is full\\)"),
        ShardedWriter(target, [infos(tensors)], ["model.safetensors"]) as writer,
    ):
        writer.write("a", tensors["a"])
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["direct", "in_kernel", "by_hand"])
def test_copy_range_appends_the_stored_bytes(tmp_path, tensors, monkeypatch, how):
    from safetensors.torch import save_file

    from merge_cli.io import direct
    from merge_cli.io.checkpoint import SafetensorsCheckpoint

    if how != "direct":  # a filesystem without O_DIRECT: copy_file_range, or by hand
        monkeypatch.setattr(direct, "_DIRECT", 0)
    if how == "by_hand":  # a filesystem without copy_file_range either

        def unsupported(*_args, **_kwargs):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", unsupported, raising=False)
    save_file(tensors, str(tmp_path / "source.safetensors"))
    source = SafetensorsCheckpoint([tmp_path / "source.safetensors"], "source", tmp_path)
    target = tmp_path / "out"
    with ShardedWriter(target, [infos(tensors)], ["model.safetensors"]) as writer:
        for name, tensor in tensors.items():
            if tensor.dim() >= 1 and tensor.shape[0] > 1:  # in two row ranges
                half = tensor.shape[0] // 2
                writer.copy_range(name, source.byte_range(name, (0, half)))
                writer.copy_range(name, source.byte_range(name, (half, tensor.shape[0])))
            else:
                writer.copy_range(name, source.byte_range(name))
        writer.finish()
    copied = load_file(target / "model.safetensors")
    assert copied.keys() == tensors.keys()
    assert all(torch.equal(copied[name], tensors[name]) for name in tensors)


def test_zero_sized_tensors_anywhere_in_a_shard_or_as_a_whole_shard(tmp_path):
    tensors = {
        "first": torch.zeros(0, 3),
        "a": torch.arange(4.0),
        "middle": torch.zeros(2, 0),
        "b": torch.ones(2),
        "last": torch.zeros(0),
        "alone": torch.zeros(0, 5),
    }
    items = list(infos(tensors))
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    target = tmp_path / "out"
    with ShardedWriter(target, [items[:5], items[5:]], names) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        writer.finish()
    loaded = {**load_file(target / names[0]), **load_file(target / names[1])}
    assert {name: tuple(t.shape) for name, t in loaded.items()} == {
        name: tuple(t.shape) for name, t in tensors.items()
    }
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])
