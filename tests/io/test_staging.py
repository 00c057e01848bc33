"""Putting outputs in place: the lock, renameat2 and its fallback, recovery after a crash.

The crash tests run merge-cli in a child process that kills itself with SIGKILL at a chosen
point (after a function of merge_cli.io.staging or of the writer), then check what is at
the target and that a rerun cleans up and succeeds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_cli.errors import OutputError
from merge_cli.io import staging
from merge_cli.io.checkpoint import TensorInfo
from merge_cli.io.staging import (
    TargetLock,
    move_into_place,
    recover_stale,
    staging_path,
    staging_stem,
)
from merge_cli.io.writer import ShardedWriter, staged_directory

#: Runs merge-cli's command line after arranging, per argv[1], to die at one point.
DRIVER = textwrap.dedent(
    """
    import os, signal, sys, time
    from merge_cli.io import staging, writer

    point = sys.argv[1]

    def die(*_args):
        os.kill(os.getpid(), signal.SIGKILL)

    def after(module, name, then):
        original = getattr(module, name)

        def patched(*args, **kwargs):
            result = original(*args, **kwargs)
            then(*args)
            return result

        setattr(module, name, patched)

    if point == "writing":  # after the first chunk of the first tensor
        after(writer.ShardedWriter, "write", die)
    elif point == "exchanged":  # the new output swapped in, the old not yet deleted
        after(staging, "exchange", die)
    elif point == "parked":  # no renameat2: the old output parked, the new not yet moved
        staging.exchange = lambda *_args: False
        original_rename = os.rename

        def rename(source, destination):
            original_rename(source, destination)
            if ".old-" in str(destination):
                die()

        os.rename = rename
    elif point == "slow":  # hold the lock a while (a concurrent run, a signal)
        after(writer.ShardedWriter, "write", lambda *_: time.sleep(0.3))
    elif point == "stuck":  # wait for a signal after the first write, saying so in a file
        marker = sys.argv.pop()

        def stuck(*_args):
            open(marker + ".writing", "w").close()
            time.sleep(60)

        after(writer.ShardedWriter, "write", stuck)
    from merge_cli.cli import main

    sys.argv = ["merge-cli", *sys.argv[2:]]
    main()
    """
)


def infos(tensors):
    return [TensorInfo(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


@pytest.fixture
def models(tmp_path):
    """Two one-file checkpoints and a linear recipe writing ``out``; returns the recipe."""
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        save_file(
            {
                "a.weight": torch.randn(64, 32, generator=generator),
                "b.weight": torch.randn(16, generator=generator),
            },
            str(tmp_path / f"m{seed}.safetensors"),
        )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"models:\n  one: {tmp_path / 'm1.safetensors'}\n  two: {tmp_path / 'm2.safetensors'}\n"
        f"fuse:\n  method: linear\n  models: {{one: {{weight: 0.25}}, two: {{weight: 0.75}}}}\n"
        f"save:\n  path: {tmp_path / 'out'}\n  dtype: float32\n"
    )
    return recipe


def drive(tmp_path, point, *args, wait=True):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    command = [sys.executable, str(script), point, *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def expected(tmp_path, first=0.25):
    one = load_file(tmp_path / "m1.safetensors")
    two = load_file(tmp_path / "m2.safetensors")
    return {name: first * one[name] + (1 - first) * two[name] for name in one}


def assert_output(tmp_path, first=0.25):
    written = load_file(tmp_path / "out" / "model.safetensors")
    for name, values in expected(tmp_path, first).items():
        torch.testing.assert_close(written[name], values)


def leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out"))


def test_kill_while_writing_leaves_nothing_and_a_rerun_succeeds(tmp_path, models):
    died = drive(tmp_path, "writing", "run", models, "--chunk-mb", "1")
    assert died.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    assert any(name.startswith(".out.partial-") for name in leftovers(tmp_path))
    again = drive(tmp_path, "none", "run", models)
    assert again.returncode == 0, again.stderr
    assert_output(tmp_path)
    assert leftovers(tmp_path) == []


def test_kill_after_the_exchange_leaves_the_new_output(tmp_path, models):
    old = ["--set", "fuse.models.one.weight=1.0", "--set", "fuse.models.two.weight=0.0"]
    assert drive(tmp_path, "none", "run", models, *old).returncode == 0
    died = drive(tmp_path, "exchanged", "run", models, "--overwrite")
    assert died.returncode == -signal.SIGKILL
    assert_output(tmp_path)  # complete, and the new one
    assert any(name.startswith(".out.partial-") for name in leftovers(tmp_path))  # the old
    again = drive(tmp_path, "none", "run", models, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert_output(tmp_path)
    assert leftovers(tmp_path) == []


def test_kill_between_the_fallback_renames_restores_the_old_output(tmp_path, models):
    old = ["--set", "fuse.models.one.weight=1.0", "--set", "fuse.models.two.weight=0.0"]
    assert drive(tmp_path, "none", "run", models, *old).returncode == 0
    died = drive(tmp_path, "parked", "run", models, "--overwrite")
    assert died.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()  # parked as .out.old-PID until the next run
    parked = [name for name in leftovers(tmp_path) if name.startswith(".out.old-")]
    assert len(parked) == 1
    # the next run puts the old output back before anything else: without --overwrite it
    # then refuses to replace it
    refused = drive(tmp_path, "none", "run", models)
    assert refused.returncode == 1 and "already exists" in refused.stderr
    assert_output(tmp_path, first=1.0)
    assert leftovers(tmp_path) == []
    again = drive(tmp_path, "none", "run", models, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert_output(tmp_path)
    assert leftovers(tmp_path) == []


def test_two_concurrent_runs_end_with_one_complete_output(tmp_path, models):
    runs = [drive(tmp_path, "slow", "run", models, wait=False) for _ in range(2)]
    results = [(run.wait(timeout=120), run.stderr.read().decode()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "another merge-cli run" in loser or "already exists" in loser
    assert_output(tmp_path)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md",
        "merge_recipe.yaml",
        "model.safetensors",
    ]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(tmp_path, models, number):
    marker = tmp_path / "signal"
    run = drive(tmp_path, "stuck", "run", models, marker, wait=False)
    deadline = time.monotonic() + 60
    while not (tmp_path / "signal.writing").exists():
        assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()
        time.sleep(0.05)
    run.send_signal(number)
    assert run.wait(timeout=60) == 128 + number
    assert "nothing was written at the output path" in run.stderr.read().decode()
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_a_held_lock_refuses_a_second_writer(tmp_path):
    target = tmp_path / "out"
    lock = TargetLock(target)
    lock.acquire()
    tensors = {"a": torch.ones(2)}
    with (
        pytest.raises(OutputError, match=f"another merge-cli run \\(pid {os.getpid()}\\)"),
        ShardedWriter(target, [infos(tensors)], ["model.safetensors"]),
    ):
        pass
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the lock file is gone too
    with ShardedWriter(target, [infos(tensors)], ["model.safetensors"]) as writer:
        writer.write("a", tensors["a"])
        writer.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_recovery_removes_dead_runs_siblings_and_keeps_live_ones(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    dead = dead_pid()
    for name in (f".out.partial-{dead}", f".out.old-{dead}", f".out.partial-{os.getppid()}"):
        (tmp_path / name).mkdir()
    (tmp_path / ".outer.partial-1").mkdir()  # another target's: not ours to touch
    done = recover_stale(target)
    assert len(done) == 2 and all("left by a run that died" in line for line in done)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".out.partial-" + str(os.getppid()),
        ".outer.partial-1",
        "out",
    ]


def test_recovery_restores_a_parked_output(tmp_path):
    target = tmp_path / "out"
    parked = tmp_path / f".out.old-{dead_pid()}"
    parked.mkdir()
    (parked / "model.safetensors").write_bytes(b"old")
    assert "restored" in recover_stale(target)[0]
    assert (target / "model.safetensors").read_bytes() == b"old"
    assert not parked.exists()


@pytest.mark.parametrize("renameat2", [True, False])
def test_move_never_replaces_an_output_that_appeared(tmp_path, monkeypatch, renameat2):
    if not renameat2:
        monkeypatch.setattr(staging, "_renameat2", lambda *_args: False)
    temp, target = tmp_path / "temp", tmp_path / "out"
    temp.mkdir()
    (temp / "new").write_text("new")
    target.mkdir()  # appeared while the run was writing
    with pytest.raises(OutputError, match="appeared while this run was writing"):
        move_into_place(temp, target, overwrite=False)
    assert sorted(p.name for p in target.iterdir()) == []
    move_into_place(temp, target, overwrite=True)
    assert (target / "new").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_renameat2_exchanges_in_one_step(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "one").touch()
    if not staging.exchange(first, second):
        pytest.skip("this filesystem has no RENAME_EXCHANGE")
    assert [p.name for p in second.iterdir()] == ["one"] and not any(first.iterdir())
    with pytest.raises(FileExistsError):
        staging.rename_no_replace(first, second)


def test_a_name_at_name_max_gets_a_short_staging_name(tmp_path):
    target = tmp_path / ("x" * 250)
    assert len(staging_stem(target)) < 50 and len(staging_path(target).name) <= 255
    tensors = {"a": torch.arange(3.0)}
    with ShardedWriter(target, [infos(tensors)], ["model.safetensors"]) as writer:
        writer.write("a", tensors["a"])
        writer.finish()
    assert torch.equal(load_file(target / "model.safetensors")["a"], tensors["a"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_staged_directory_is_locked_and_cleaned(tmp_path):
    target = tmp_path / "out"
    with staged_directory(target) as temp:
        (temp / "member").write_text("x")
        with pytest.raises(OutputError, match="another merge-cli run"), staged_directory(target):
            pass
    assert (target / "member").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failure_between_the_fallback_renames_puts_the_old_output_back(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "_renameat2", lambda *_args: False)
    temp, target = tmp_path / "temp", tmp_path / "out"
    temp.mkdir()
    target.mkdir()
    (target / "old").write_text("old")
    original = os.rename

    def interrupted(source, destination):
        if source == temp:
            raise KeyboardInterrupt  # SIGTERM arriving between the two renames
        original(source, destination)

    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        move_into_place(temp, target, overwrite=True)
    assert (target / "old").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "temp"]


@pytest.mark.parametrize("renameat2", [True, False])
def test_overwriting_a_symlink_replaces_the_link_not_what_it_points_to(
    tmp_path, monkeypatch, renameat2
):
    if not renameat2:
        monkeypatch.setattr(staging, "_renameat2", lambda *_args: False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "kept").write_text("kept")
    target, temp = tmp_path / "out", tmp_path / "temp"
    target.symlink_to(elsewhere)
    temp.mkdir()
    (temp / "new").write_text("new")
    move_into_place(temp, target, overwrite=True)
    assert not target.is_symlink() and (target / "new").read_text() == "new"
    assert (elsewhere / "kept").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]
