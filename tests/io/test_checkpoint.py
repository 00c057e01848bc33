"""Loading checkpoints: formats, lazy reads, Hub cache, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from merge_cli.errors import CheckpointError
from merge_cli.io import open_checkpoint
from merge_cli.io.checkpoint import read_state_dict


@pytest.fixture
def state():
    generator = torch.Generator().manual_seed(0)
    return {
        "layers.0.weight": torch.randn(6, 4, generator=generator),
        "layers.0.bias": torch.randn(6, generator=generator),
        "norm.num_batches_tracked": torch.tensor(3),
    }


def test_single_safetensors_file_is_lazy_and_reads_rows(tmp_path, state):
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    ckpt = open_checkpoint(str(path))
    assert sorted(ckpt.tensor_names()) == sorted(state)
    assert ckpt.info("layers.0.weight").shape == (6, 4)
    assert ckpt.info("layers.0.weight").nbytes == 96
    assert torch.equal(ckpt.read("layers.0.weight", (2, 5)), state["layers.0.weight"][2:5])
    assert torch.equal(ckpt.read("norm.num_batches_tracked"), torch.tensor(3))


def test_sharded_directory_with_and_without_index(tiny_llamas, tmp_path):
    with_index = open_checkpoint(str(tiny_llamas["base"]))
    copy = tmp_path / "noindex"
    shutil.copytree(tiny_llamas["base"], copy)
    (copy / "model.safetensors.index.json").unlink()
    without_index = open_checkpoint(str(copy))
    assert with_index.tensor_names() == without_index.tensor_names()
    assert len(with_index.tensor_names()) == 39
    name = "model.layers.1.mlp.up_proj.weight"
    assert with_index.info(name).dtype == torch.bfloat16
    assert torch.equal(with_index.read(name), without_index.read(name))


def test_each_shard_is_opened_once_and_closed_with_the_checkpoint(tiny_llamas, monkeypatch):
    """Reads share one descriptor per file (the kernel's read-ahead then follows the chunks
    read in turn); the descriptors close when the checkpoint is collected."""
    import gc
    import os

    opened = []
    original_open = os.open

    def counted_open(path, *args, **kwargs):
        opened.append(descriptor := original_open(path, *args, **kwargs))
        return descriptor

    monkeypatch.setattr(os, "open", counted_open)
    checkpoint = open_checkpoint(str(tiny_llamas["base"]))
    names = checkpoint.tensor_names()
    for name in names:
        checkpoint.read(name)
        checkpoint.read(name, (0, 1))
    shards = {checkpoint.file_of(name) for name in names}
    assert len(shards) > 1 and len(opened) == len(shards)
    del checkpoint
    gc.collect()
    for descriptor in opened:
        with pytest.raises(OSError):
            os.fstat(descriptor)


def test_torch_state_dict_loads_safely(tmp_path, state):
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    loaded = read_state_dict(open_checkpoint(str(tmp_path)))
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    nested = tmp_path / "lightning.pt"
    torch.save({"state_dict": state, "epoch": 3}, nested)
    assert set(open_checkpoint(str(nested)).tensor_names()) == set(state)


class Payload:
    def __reduce__(self):  # would run code when unpickled
        return (print, ("unpickled!",))


def test_arbitrary_pickles_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.bin"
    with open(path, "wb") as handle:
        torch.save({"w": torch.zeros(2), "payload": Payload()}, handle, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="never unpickles arbitrary objects"):
        open_checkpoint(str(path))
    assert "unpickled!" not in capsys.readouterr().out


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        open_checkpoint(str(tmp_path / "nothere"))


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds no .safetensors, .bin or .pt weights"):
        open_checkpoint(str(tmp_path))


def test_corrupt_header(tmp_path, state):
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    data = bytearray(path.read_bytes())
    data[8:20] = b"this is junk"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"m.safetensors: not a valid safetensors file"):
        open_checkpoint(str(path))


def test_truncated_shard(tiny_llamas, tmp_path):
    copy = tmp_path / "truncated"
    shutil.copytree(tiny_llamas["base"], copy)
    shard = copy / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(
        CheckpointError, match=r"model-00002-of-00002.safetensors: not a valid .*truncated"
    ):
        open_checkpoint(str(copy))


def test_index_naming_a_missing_shard(tiny_llamas, tmp_path):
    copy = tmp_path / "missing"
    shutil.copytree(tiny_llamas["base"], copy)
    (copy / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names shard model-00001-of-00002.safetensors"):
        open_checkpoint(str(copy))


def test_missing_tensor_read(tmp_path, state):
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match="has no tensor named 'nope'"):
        open_checkpoint(str(tmp_path / "m.safetensors")).info("nope")


def _fake_hub_cache(cache, repo_id, source, commit="a" * 40):
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return commit


def test_hub_reference_uses_local_cache_offline(tiny_llamas, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    commit = _fake_hub_cache(cache, "org/tiny", tiny_llamas["math"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for reference in ("hf://org/tiny", f"hf://org/tiny@{commit}"):
        ckpt = open_checkpoint(reference)
        assert ckpt.source == reference
        assert len(ckpt.tensor_names()) == 39
        assert json.loads((ckpt.directory / "config.json").read_text())["model_type"] == "llama"
    with pytest.raises(CheckpointError, match="not in the local Hub cache.*HF_HUB_OFFLINE"):
        open_checkpoint("hf://org/absent")
    with pytest.raises(CheckpointError, match="expected hf://org/name"):
        open_checkpoint("hf://just-a-name")


@pytest.mark.parametrize("index", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
@pytest.mark.parametrize("escape", ["../secret/model.safetensors", "ABSOLUTE", "sub/../../x"])
def test_an_index_cannot_name_a_file_outside_its_directory(tmp_path, state, index, escape):
    secret = tmp_path / "secret"
    secret.mkdir()
    save_file({"stolen": torch.ones(3)}, str(secret / "model.safetensors"))
    model = tmp_path / "model"
    model.mkdir()
    name = str(secret / "model.safetensors") if escape == "ABSOLUTE" else escape
    (model / index).write_text(json.dumps({"weight_map": {"stolen": name}}))
    with pytest.raises(CheckpointError, match="outside the model's directory; refusing"):
        open_checkpoint(str(model))


@pytest.mark.parametrize(
    "weight_map", [["a.safetensors"], {"w": 3}, "model.safetensors", None, {"w": ["x"]}]
)
def test_an_index_of_the_wrong_shape_is_one_clear_error(tmp_path, state, weight_map):
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="not a valid shard index"):
        open_checkpoint(str(tmp_path))


def test_an_index_may_name_shards_in_a_subdirectory(tmp_path, state):
    (tmp_path / "shards").mkdir()
    save_file(state, str(tmp_path / "shards" / "one.safetensors"))
    weight_map = dict.fromkeys(state, "shards/one.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert set(open_checkpoint(str(tmp_path)).tensor_names()) == set(state)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_a_fifo_named_like_weights_is_refused_not_waited_on(tmp_path, name):
    os.mkfifo(tmp_path / name)
    with pytest.raises(CheckpointError, match="not a regular file"):
        open_checkpoint(str(tmp_path))


def test_pickles_are_refused_below_the_safe_torch(tmp_path, state):
    from merge_cli.io.torch_format import refuse_unsafe_torch, torch_version

    assert torch_version("2.13.0+cpu") == (2, 13) and torch_version("2.9.1") == (2, 9)
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    refuse_unsafe_torch(path, "2.10.0")
    with pytest.raises(CheckpointError, match="refusing to unpickle with torch 2.5.1"):
        refuse_unsafe_torch(path, "2.5.1")
