"""An in-process fake Hugging Face Hub: push, pull and cache behave as with the real Hub, with no network.

`huggingface_hub` (and through it diffusers and transformers) sends every request through one shared HTTP client
made by the factory given to `huggingface_hub.set_client_factory`. `FakeHub` installs a factory whose client uses an
`httpx2.MockTransport` answering the few endpoints that push and pull use:

- `POST /api/repos/create`, `POST /api/validate-yaml`
- `POST /api/models/{repo}/preupload/{rev}` (every file "regular": no LFS or Xet upload)
- `POST /api/models/{repo}/commit/{rev}` (the NDJSON commit)
- `GET /api/models/{repo}[/revision/{rev}]` (model info with siblings), `GET /api/models/{repo}/tree/{rev}[/path]`
- `HEAD`/`GET /{repo}/resolve/{rev}/{path}` (file metadata and content)

Repos live in memory as a list of commits (each a full `{path: bytes}` snapshot), so revisions by commit hash work.
Every request is recorded in `hub.requests` (method, path, query) for assertions.

Use as a context manager, or through the `fake_hub` fixture of the tests that import it::

    with FakeHub() as hub:
        pipe.push_to_hub("org/name", token="fake")
"""

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

import httpx2
from huggingface_hub import constants as hf_constants
from huggingface_hub import set_client_factory
from huggingface_hub.utils import _http as hf_http

ENDPOINT = "https://huggingface.co"


@dataclass
class FakeRepo:
    repo_id: str
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # (sha, files), oldest first

    def snapshot(self, revision: str | None) -> tuple[str, dict[str, bytes]] | None:
        if not self.commits:
            return None
        if revision in (None, "main"):
            return self.commits[-1]
        for sha, files in self.commits:
            if sha == revision:
                return sha, files
        return None


class FakeHub:
    """An in-memory Hub behind `huggingface_hub`'s HTTP client (see the module docstring)."""

    def __init__(self):
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str, str]] = []
        self._previous_factory = None
        self._previous_offline = None

    # ------------------------------------------------------------------------------------------------------
    def __enter__(self) -> "FakeHub":
        self._previous_factory = hf_http._GLOBAL_CLIENT_FACTORY
        self._previous_offline = hf_constants.HF_HUB_OFFLINE
        hf_constants.HF_HUB_OFFLINE = False
        # The Hub client's own request hook is kept: it is what enforces HF_HUB_OFFLINE.
        set_client_factory(
            lambda: httpx2.Client(
                transport=httpx2.MockTransport(self.handle),
                event_hooks={"request": [hf_http.hf_request_event_hook]},
                follow_redirects=True,
            )
        )
        return self

    def __exit__(self, *exc):
        set_client_factory(self._previous_factory)
        hf_constants.HF_HUB_OFFLINE = self._previous_offline

    # ------------------------------------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str | None = None) -> dict[str, bytes]:
        """The files of a repo at a revision (the latest commit by default)."""
        snapshot = self.repos[repo_id].snapshot(revision)
        return dict(snapshot[1]) if snapshot else {}

    def head_sha(self, repo_id: str) -> str:
        return self.repos[repo_id].commits[-1][0]

    def requested_paths(self, method: str | None = None) -> list[str]:
        return [p for m, p, _ in self.requests if method is None or m == method]

    # ------------------------------------------------------------------------------------------------------
    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = unquote(request.url.path)
        self.requests.append((request.method, path, str(request.url.query)))
        routes = (
            ("POST", r"^/api/repos/create$", self._create_repo),
            ("POST", r"^/api/validate-yaml$", lambda r: _json({"errors": [], "warnings": []})),
            ("POST", r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$", self._preupload),
            ("POST", r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$", self._commit),
            ("GET", r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?$", self._tree),
            ("GET", r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$", self._model_info),
            ("HEAD", r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", self._resolve),
            ("GET", r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", self._resolve),
        )
        for method, pattern, handler in routes:
            match = re.match(pattern, path)
            if request.method == method and match:
                return handler(request, **match.groupdict()) if match.groupdict() else handler(request)
        return _error(404, "EntryNotFound", f"fake Hub: no route for {request.method} {path}")

    def _repo_or_404(self, repo_id: str):
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, _error(401, "RepoNotFound", f"Repository Not Found for url: {repo_id}")
        return repo, None

    def _snapshot_or_404(self, repo_id: str, revision: str | None):
        """`((sha, files), None)` for a known repo and revision, else `(None, the Hub's 401 or 404 response)`."""
        found, error = self._repo_or_404(repo_id)
        if error:
            return None, error
        snapshot = found.snapshot(revision)
        if snapshot is None:
            return None, _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return snapshot, None

    def _create_repo(self, request):
        body = json.loads(request.content)
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if "/" not in repo_id:
            repo_id = f"fake-user/{repo_id}"
        if repo_id not in self.repos:
            # As on the Hub, a new repo starts with one commit holding `.gitattributes`.
            sha = hashlib.sha1(f"{repo_id}:initial".encode()).hexdigest()
            self.repos[repo_id] = FakeRepo(repo_id, [(sha, {".gitattributes": b"*.safetensors filter=lfs\n"})])
        return _json({"url": f"{ENDPOINT}/{repo_id}", "name": repo_id})

    def _preupload(self, request, repo, rev):
        body = json.loads(request.content)
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in body["files"]]
        return _json({"files": files, "commitOid": None})

    def _commit(self, request, repo, rev):
        found, error = self._repo_or_404(repo)
        if error:
            return error
        snapshot = found.snapshot(None)
        files = dict(snapshot[1]) if snapshot else {}
        summary = ""
        for line in request.content.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:
                return _error(400, None, f"fake Hub: unsupported commit item {key!r}")
        sha = hashlib.sha1(f"{repo}:{len(found.commits)}:{summary}".encode()).hexdigest()
        found.commits.append((sha, files))
        return _json({"commitUrl": f"{ENDPOINT}/{repo}/commit/{sha}", "commitOid": sha, "success": True})

    def _model_info(self, request, repo, rev=None):
        snapshot, error = self._snapshot_or_404(repo, rev)
        if error:
            return error
        sha, files = snapshot
        return _json(
            {
                "id": repo,
                "modelId": repo,
                "sha": sha,
                "private": False,
                "siblings": [{"rfilename": p, "size": len(c)} for p, c in sorted(files.items())],
            }
        )

    def _tree(self, request, repo, rev, sub=None):
        snapshot, error = self._snapshot_or_404(repo, rev)
        if error:
            return error
        prefix = (sub.rstrip("/") + "/") if sub else ""
        entries, folders = [], set()
        for p, content in sorted(snapshot[1].items()):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                folders.add(prefix + "/".join(parts[:depth]))
            entries.append({"type": "file", "path": p, "size": len(content), "oid": _git_oid(content)})
        entries += [{"type": "directory", "path": f, "oid": _git_oid(f.encode())} for f in sorted(folders)]
        return _json(entries)

    def _resolve(self, request, repo, rev, file):
        snapshot, error = self._snapshot_or_404(repo, rev)
        if error:
            return error
        sha, files = snapshot
        if file not in files:
            return _error(404, "EntryNotFound", f"{file} does not exist on {rev}", headers={"X-Repo-Commit": sha})
        content = files[file]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{_git_oid(content)}"',
            "Content-Length": str(len(content)),
        }
        return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else content)


def _git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _json(payload) -> httpx2.Response:
    return httpx2.Response(200, json=payload)


def _error(status: int, code: str | None, message: str, headers: dict | None = None) -> httpx2.Response:
    headers = dict(headers or {})
    if code:
        headers["X-Error-Code"] = code
    headers["X-Error-Message"] = message
    return httpx2.Response(status, headers=headers, json={"error": message})
