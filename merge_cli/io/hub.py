"""Uploading a finished output directory to a Hugging Face Hub model repository
(``save.push_to_hub``, ``merge-cli run --push-to-hub``).

Everything goes through ``huggingface_hub``'s own API: :meth:`HfApi.create_repo` (created
if absent, ``exist_ok``), :meth:`HfApi.create_branch` for a ``revision`` other than main,
and :meth:`HfApi.upload_folder`. With ``hf_xet`` installed (a dependency of
huggingface_hub >= 1.0) upload_folder is the streamed, multi-commit upload that replaced
``upload_large_folder`` (removed in huggingface_hub 2): it retries, splits a large folder
into several commits, and an interrupted upload resumes when run again (files already
committed are skipped, uploaded chunks deduplicated). Older huggingface_hub versions upload
the folder in one commit.

The token comes from where huggingface_hub looks for it (``HF_TOKEN``, then the cached
``hf auth login``); it is never put in a message. The endpoint is ``HF_ENDPOINT`` when set
(read at call time, as a test's stand-in server needs), else the Hub.
"""

from __future__ import annotations

import os
from pathlib import Path

from merge_cli.errors import PublishError

#: Values of HF_HUB_OFFLINE that mean offline (as huggingface_hub reads it).
_TRUE = ("1", "true", "yes", "on")


def is_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids network access."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in _TRUE


def hub_token() -> str | None:
    """The token huggingface_hub would use (``HF_TOKEN``, then the cached login), or None."""
    from huggingface_hub import get_token

    return get_token()


def repo_id_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` cannot name a Hub repository (``org/name``), or None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        return f"expected org/name (a user or organization, a slash, a name), got {repo_id!r}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return (
            "not a valid Hub repository id: names use letters, digits, '-', '_' and '.', "
            "do not start or end with '-' or '.', hold no '--' or '..', and are at most 96 "
            f"characters; got {repo_id!r}"
        )
    return None


def push_blocker() -> str | None:
    """Why an upload cannot start from this environment (offline, no token), or None:
    checked before any merge work, so a run never merges to fail at the upload."""
    if is_offline():
        return (
            "HF_HUB_OFFLINE is set: uploading needs the network; unset it, or remove "
            "save.push_to_hub and upload the output later"
        )
    if not hub_token():
        return (
            "no Hugging Face token: set HF_TOKEN or log in with `hf auth login` "
            "(a token with write access to the repository)"
        )
    return None


def push_folder(
    folder: Path,
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload ``folder`` (a complete output) to model repository ``repo_id``; return the
    URL of the commit that holds it."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    blocker = push_blocker()
    if blocker is not None:
        raise PublishError(f"save.push_to_hub: {blocker}")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=hub_token())
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {folder.name} (merged with merge-cli)",
        )
    except HfHubHTTPError as error:
        raise PublishError(f"{repo_id}: the Hub refused the upload: {error}") from None
    except Exception as error:  # network errors (httpx), bad arguments: one message each
        raise PublishError(f"{repo_id}: upload to the Hub failed: {error}") from None
    return str(info.commit_url)
