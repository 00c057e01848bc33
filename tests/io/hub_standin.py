"""A Hub-compatible HTTP endpoint on 127.0.0.1 for the upload tests (never the network).

It implements exactly what ``huggingface_hub`` (2.x, installed here) calls for
``HfApi.create_repo`` + ``create_branch`` + ``upload_folder``, model repositories only:

* ``POST /api/repos/create`` (JSON ``name``, ``organization``, ``visibility``): 200 with
  ``{"url"}``, or 409 with ``{"url"}`` when the repository exists (``exist_ok`` accepts it);
* ``POST /api/models/ORG/NAME/branch/BRANCH``: a branch from main (409 when it exists);
* ``POST /api/models/ORG/NAME/preupload/REV``: every file is ``uploadMode: regular`` (its
  content travels base64 in the commit; no LFS/Xet storage is emulated), with ``oid`` (the
  git blob SHA-1) of the file already at REV, which the client compares with its own to
  skip files already committed: how an interrupted upload resumes;
* ``POST /api/models/ORG/NAME/commit/REV`` (NDJSON: ``header``, ``file`` lines): stores the
  files on REV and answers ``{"commitUrl", "commitOid"}``;
* ``GET /api/models/ORG/NAME/revision/REV``: ``{"id", "sha", "siblings"}`` (asked when an
  upload finds nothing left to commit);
* ``POST /api/validate-yaml`` (a README.md about to be uploaded): 200 when its front
  matter is a YAML mapping, else 400 with ``errors`` (the Hub checks more; the card's
  fields are checked by the card tests). The cards it saw are kept in ``validated``;
* ``GET /api/agent-harnesses`` (huggingface_hub's user-agent registry): 404, not recorded.

Every request needs ``Authorization: Bearer TOKEN`` (else 401). ``stall_after_commits=N``
makes every commit after the N-th wait forever (a test then kills the uploader).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStandIn:
    def __init__(self, token: str, stall_after_commits: int | None = None):
        self.token = token
        self.stall_after_commits = stall_after_commits
        #: repo id -> {"private": ..., "branches": {name: {path: bytes}}}
        self.repos: dict[str, dict[str, Any]] = {}
        #: every commit: (repo, revision, summary, [paths])
        self.commits: list[tuple[str, str, str, list[str]]] = []
        self.requests: list[tuple[str, str]] = []
        self.authorizations: set[str] = set()
        self.validated: list[str] = []
        self._release = threading.Event()
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo]["branches"][revision])

    # -- endpoints ---------------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        repo = f"{body['organization']}/{body['name']}"
        url = {"url": f"{self.url}/{repo}"}
        with self._lock:
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", **url}
            self.repos[repo] = {"private": body.get("visibility"), "branches": {"main": {}}}
        return 200, url

    def branch(self, repo: str, name: str) -> tuple[int, dict[str, Any]]:
        branches = self.repos[repo]["branches"]
        if name in branches:
            return 409, {"error": "Reference already exists"}
        branches[name] = dict(branches["main"])
        return 200, {}

    def preupload(self, repo: str, rev: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        present = self.repos[repo]["branches"][rev]
        files = []
        for item in body["files"]:
            data = present.get(item["path"])
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(data) if data is not None else None,
                }
            )
        return 200, {"files": files}

    def commit(self, repo: str, rev: str, lines: list[dict[str, Any]]) -> tuple[int, dict]:
        with self._lock:
            if self.stall_after_commits is not None and (
                len(self.commits) >= self.stall_after_commits
            ):
                stall = True
            else:
                stall = False
        if stall:
            self._release.wait()
            return 503, {"error": "stand-in stopped"}
        summary = ""
        paths = []
        target = self.repos[repo]["branches"][rev]
        for line in lines:
            if line["key"] == "header":
                summary = line["value"]["summary"]
            elif line["key"] == "file":
                value = line["value"]
                target[value["path"]] = base64.b64decode(value["content"])
                paths.append(value["path"])
            else:
                return 400, {"error": f"stand-in: unsupported commit line {line['key']!r}"}
        with self._lock:
            self.commits.append((repo, rev, summary, paths))
            oid = hashlib.sha1(f"{repo}{rev}{len(self.commits)}".encode()).hexdigest()
            self.repos[repo]["sha"] = oid
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid}

    def validate_yaml(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        import yaml

        content = body["content"]
        self.validated.append(content)
        parts = content.split("---\n", 2)
        front = (
            yaml.safe_load(parts[1]) if content.startswith("---\n") and len(parts) == 3 else None
        )
        if not isinstance(front, dict):
            return 400, {"errors": [{"message": "front matter is not a YAML mapping"}]}
        return 200, {"warnings": []}

    def revision(self, repo: str, rev: str) -> tuple[int, dict[str, Any]]:
        files = self.repos[repo]["branches"][rev]
        return 200, {
            "id": repo,
            "sha": self.repos[repo].get("sha", "0" * 40),
            "siblings": [{"rfilename": name} for name in files],
        }


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        value = self.headers.get("Authorization", "")
        self.hub.authorizations.add(value)
        if value != f"Bearer {self.hub.token}":
            self._answer(401, {"error": "Invalid credentials in Authorization header"})
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/api/agent-harnesses"):
            self._answer(404, {"error": "not implemented by the stand-in"})
            return
        self.hub.requests.append(("GET", self.path))
        if not self._authorized():
            return
        found = re.fullmatch(REPO + r"/revision/(?P<rev>[^/?]+)(\?.*)?", self.path)
        if found and found["repo"] in self.hub.repos:
            self._answer(*self.hub.revision(found["repo"], found["rev"]))
        else:
            self._answer(404, {"error": "Repository not found"})

    def do_POST(self) -> None:  # noqa: N802
        self.hub.requests.append(("POST", self.path))
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not self._authorized():
            return
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            self._answer(*self.hub.create(json.loads(raw)))
            return
        if path == "/api/validate-yaml":
            self._answer(*self.hub.validate_yaml(json.loads(raw)))
            return
        found = re.fullmatch(REPO + r"/(?P<kind>preupload|commit|branch)/(?P<rev>[^/]+)", path)
        if not found or found["repo"] not in self.hub.repos:
            self._answer(404, {"error": "Repository not found"})
            return
        repo, rev = found["repo"], found["rev"]
        if found["kind"] == "branch":
            self._answer(*self.hub.branch(repo, rev))
        elif rev not in self.hub.repos[repo]["branches"]:
            self._answer(404, {"error": f"Invalid rev id: {rev}"})
        elif found["kind"] == "preupload":
            self._answer(*self.hub.preupload(repo, rev, json.loads(raw)))
        else:
            lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
            self._answer(*self.hub.commit(repo, rev, lines))
