"""Uploading to the Hub (save.push_to_hub, run --push-to-hub) against a Hub-compatible
endpoint started on 127.0.0.1 by the test (tests/io/hub_standin.py says which endpoints it
implements), and against the real Hub when a token and the network are there.

Uploads run in subprocesses: this process has imported huggingface_hub with
HF_HUB_OFFLINE=1, which it reads once, at import."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.io.hub_standin import HubStandIn

REPO = Path(__file__).resolve().parents[2]
TOKEN = "hf_standin_secret_token_0123456789"
MERGE_CLI = [sys.executable, "-m", "merge_cli"]


def _env(hub: HubStandIn | None, tmp_path: Path, token: str | None = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.update(HF_HUB_OFFLINE="0", PYTHONPATH=str(REPO))
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def _recipe(tiny_llamas, tmp_path: Path, push: object = None) -> Path:
    import yaml

    save: dict = {"path": str(tmp_path / "out"), "dtype": "float32"}
    if push is not None:
        save["push_to_hub"] = push
    recipe = {
        "models": {name: str(path) for name, path in tiny_llamas.items()},
        "fuse": {"method": "ties", "base": "base", "params": {"density": 0.5}},
        "save": save,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(args: list[str], env: dict[str, str], timeout: float = 180):
    return subprocess.run(
        [*MERGE_CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def _local_files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def test_run_pushes_the_complete_output_and_reports_the_commit(tiny_llamas, tmp_path):
    recipe = _recipe(
        tiny_llamas,
        tmp_path,
        {"repo_id": "my-org/merged", "private": True, "commit_message": "TIES of math and code"},
    )
    with HubStandIn(TOKEN) as hub:
        done = _run(["run", str(recipe), "--json"], _env(hub, tmp_path))
        assert done.returncode == 0, done.stderr
        payload = json.loads(done.stdout)
        commits = list(hub.commits)
        files = hub.files("my-org/merged")
        private = hub.repos["my-org/merged"]["private"]
    assert [(c[0], c[1], c[2]) for c in commits] == [
        ("my-org/merged", "main", "TIES of math and code")
    ]
    assert payload["commit_url"].startswith(f"{hub.url}/my-org/merged/commit/")
    output = tmp_path / "out"
    assert files == _local_files(output)  # byte for byte, every file of the output
    assert {"model.safetensors", "README.md", "config.json", "merge_recipe.yaml"} <= set(files)
    assert private == "private"
    assert hub.authorizations == {f"Bearer {TOKEN}"}
    assert hub.validated == [files["README.md"].decode()]
    assert TOKEN not in done.stdout + done.stderr


def test_push_to_hub_option_with_a_branch(tiny_llamas, tmp_path):
    recipe = _recipe(tiny_llamas, tmp_path, {"repo_id": "x/y", "revision": "v1"})
    with HubStandIn(TOKEN) as hub:
        done = _run(
            ["run", str(recipe), "--push-to-hub", "my-org/other", "--json"], _env(hub, tmp_path)
        )
        assert done.returncode == 0, done.stderr
        assert set(hub.repos) == {"my-org/other"}  # the option replaces the repo id only
        assert hub.files("my-org/other", "main") == {}
        assert "model.safetensors" in hub.files("my-org/other", "v1")
        assert [c[1] for c in hub.commits] == ["v1"]


def test_without_a_token_nothing_is_merged_or_uploaded(tiny_llamas, tmp_path):
    recipe = _recipe(tiny_llamas, tmp_path, "my-org/merged")
    with HubStandIn(TOKEN) as hub:
        for command in ("run", "validate"):
            done = _run([command, str(recipe)], _env(hub, tmp_path, token=None))
            assert done.returncode == 1
            assert "no Hugging Face token: set HF_TOKEN or log in" in done.stderr
            assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
        assert hub.requests == []
    assert not (tmp_path / "out").exists()


def test_offline_refuses_before_any_merge_work(tiny_llamas, tmp_path, cli):
    """HF_HUB_OFFLINE (set for the whole suite): exit 1, one message, no output."""
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    recipe = _recipe(tiny_llamas, tmp_path, "my-org/merged")
    code, out, err = cli("run", recipe, "--json")
    assert code == 1
    error = json.loads(out)
    assert error["ok"] is False and error["kind"] == "PublishError"
    assert error["error"].startswith("save.push_to_hub: HF_HUB_OFFLINE is set")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("repo_id", "message"),
    [
        ("merged", "expected org/name"),
        ("org/name/extra", "expected org/name"),
        ("org/bad name", "not a valid Hub repository id"),
        ("org/--x", "not a valid Hub repository id"),
    ],
)
def test_an_invalid_repo_id_is_a_recipe_error(tiny_llamas, tmp_path, cli, repo_id, message):
    recipe = _recipe(tiny_llamas, tmp_path)
    code, _, err = cli("validate", recipe, "--push-to-hub", repo_id)
    assert code == 2
    assert f"save.push_to_hub.repo_id: {message}" in " ".join(err.split())
    assert err.count("error:") == 1
    code, _, err = cli("run", recipe, "--set", f"save.push_to_hub={repo_id}")
    assert code == 2 and message in " ".join(err.split())
    assert not (tmp_path / "out").exists()


def test_a_killed_upload_resumes(tiny_llamas, tmp_path):
    """The first upload is killed after committing some files (commits forced one file at a
    time, as a large folder would be split); run again, it commits only the rest."""
    recipe = _recipe(tiny_llamas, tmp_path)
    merged = _run(["run", str(recipe)], _env(None, tmp_path))
    assert merged.returncode == 0, merged.stderr
    output = tmp_path / "out"
    push = (
        "import sys; from pathlib import Path; import huggingface_hub._upload_pipeline as p; "
        "p.REGULAR_CONTENT_BYTES_BUDGET = 1 if sys.argv[2] == 'small' else "
        "p.REGULAR_CONTENT_BYTES_BUDGET; from merge_cli.io.hub import push_folder; "
        "print(push_folder(Path(sys.argv[1]), 'my-org/resumed'))"
    )
    with HubStandIn(TOKEN, stall_after_commits=2) as hub:
        first = subprocess.Popen(
            [sys.executable, "-c", push, str(output), "small"],
            env=_env(hub, tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        while len(hub.commits) < 2 and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        first.send_signal(signal.SIGKILL)
        first.wait()
        before = [path for commit in hub.commits for path in commit[3]]
        assert len(before) == 2 and len(hub.commits) == 2
        hub.stall_after_commits = None
        second = subprocess.run(
            [sys.executable, "-c", push, str(output), "whole"],
            env=_env(hub, tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 0, second.stderr
        resumed = hub.commits[2:]
        files = hub.files("my-org/resumed")
    local = _local_files(output)
    assert len(resumed) == 1
    assert sorted(resumed[0][3]) == sorted(set(local) - set(before))  # nothing sent twice
    assert files == local
    assert (
        second.stdout.strip()
        == f"{hub.url}/my-org/resumed/commit/" + (second.stdout.strip().rsplit("/", 1)[1])
    )


@pytest.mark.skipif(
    os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    or not os.environ.get("MERGE_CLI_HUB_TEST_TOKEN"),
    reason="the real Hub: needs the network (HF_HUB_OFFLINE unset) and "
    "MERGE_CLI_HUB_TEST_TOKEN (a write token for a throwaway private repository)",
)
def test_real_hub_upload(tiny_llamas, tmp_path):  # pragma: no cover - online only
    import uuid

    from huggingface_hub import HfApi

    token = os.environ["MERGE_CLI_HUB_TEST_TOKEN"]
    api = HfApi(token=token)
    repo_id = f"{api.whoami()['name']}/merge-cli-test-{uuid.uuid4().hex[:8]}"
    recipe = _recipe(tiny_llamas, tmp_path, {"repo_id": repo_id, "private": True})
    try:
        done = _run(["run", str(recipe), "--json"], _env(None, tmp_path, token=token), 600)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["commit_url"].startswith("https://huggingface.co/")
        remote = set(api.list_repo_files(repo_id))
        assert set(_local_files(tmp_path / "out")) <= remote
        assert "merge" in (api.model_info(repo_id).card_data or {}).get("tags", [])
    finally:
        api.delete_repo(repo_id, missing_ok=True)


def test_plan_shows_the_upload_stage(tiny_llamas, tmp_path, cli):
    recipe = _recipe(tiny_llamas, tmp_path, {"repo_id": "my-org/merged", "private": True})
    code, out, _ = cli("plan", recipe, "--json")
    assert code == 0  # plan uploads nothing: it needs neither the network nor a token
    assert json.loads(out)["stages"] == [
        "load",
        "fuse (ties)",
        "save",
        "upload (my-org/merged)",
    ]
