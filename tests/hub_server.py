"""A local stand-in for the part of the Hugging Face Hub API that the pipeline uses, for tests.

It answers what huggingface_hub 1.33 sends for whoami, create_repo, repo_info, upload_folder (README
validation, preupload answering "regular" for every file so nothing goes through LFS or Xet, the tree
listing behind delete_patterns, and the NDJSON commit), Space variables and pausing a Space.
It also serves dataset repositories that a test adds with `add_dataset`, enough for
`datasets.load_dataset(repo, name=..., split=..., streaming=True)` (datasets 5.2) to stream them:
  GET       /api/datasets/{repo}[/revision/{rev}]      dataset_info: sha, siblings, cardData
  GET       /api/datasets/{repo}/tree/{rev}[/{path}]    list_repo_tree (?recursive=true), behind HfFileSystem
  POST      /api/datasets/{repo}/paths-info/{rev}       get_paths_info (form field `paths`, repeated)
  GET, HEAD /datasets/{repo}/resolve/{rev}/{path}       the file, with ETag, X-Repo-Commit and
                                                        Content-Length; a Range header gets 206
{rev} is "main" or the repository's head commit. Errors carry the Hub's X-Error-Code (RepoNotFound,
RevisionNotFound, EntryNotFound), from which huggingface_hub picks its exception class. Like every route,
these want the token. `point_datasets_at` points both libraries in the test's process at the stand-in.
GET /api/agent-harnesses, which huggingface_hub fetches without a token, answers an empty registry.
It records every request (and in `unrouted` those no route answered) and keeps the committed files, and
it can fail requests on demand: answer an HTTP error (with headers such as Retry-After), reset the
connection halfway through reading a request's body, or stall without answering.
Run it alone with `python tests/hub_server.py [TOKEN]` to point HF_ENDPOINT at it by hand.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_REV = r"(?P<rev>[^/]+)"
_PATH = r"(?P<path>.+)"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)  # {"oid", "summary", "description"}

    @property
    def head(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40


@dataclass
class Space:
    variables: dict[str, str] = field(default_factory=dict)
    stage: str = "RUNNING"


@dataclass
class Fault:
    """What a failing request gets: kind "status" answers `status` with `headers`; "reset" reads half
    the body and resets the connection; "stall" reads the request and answers nothing for `seconds`."""

    kind: str
    remaining: int | None  # None: every matching request fails
    path_contains: str | None
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


class HubStandIn:
    """The server and its state. Use as a context manager, or call start()/stop()."""

    def __init__(self, token: str = "hf_standin_token", user: str = "tester", role: str = "write"):
        self.token, self.user, self.role = token, user, role
        self.requests: list[Recorded] = []
        # Requests that no route answered: what a newer client asks that the stand-in does not know yet.
        self.unrouted: list[Recorded] = []
        self.repos: dict[str, Repo] = {}
        self.spaces: dict[str, Space] = {}
        self.datasets: dict[str, Repo] = {}
        self.token_rejected = False
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubStandIn:
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (for running the stand-in by hand)."""
        try:
            self._server.serve_forever()
        finally:
            self._server.server_close()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- what tests ask for ---
    def add_space(self, space_id: str) -> Space:
        return self.spaces.setdefault(space_id, Space())

    def add_dataset(self, repo_id: str, files: dict[str, bytes]) -> Repo:
        """A dataset repository holding `files` (path in the repository -> content) in one commit.
        Configs go in README.md's YAML front matter, as on the Hub. Adding it again replaces its files
        with a new commit, so a cached copy of the old head is never taken for the new one."""
        stored = self.datasets.setdefault(repo_id, Repo())
        stored.files = dict(files)
        digest = hashlib.sha1(repr(len(stored.commits)).encode())
        for path, data in sorted(files.items()):
            digest.update(path.encode() + b"\0" + data)
        stored.commits.append({"oid": digest.hexdigest(), "summary": "add_dataset", "description": ""})
        return stored

    def fail_next(
        self, count: int, status: int = 503, path_contains: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        """The next `count` requests (whose path contains `path_contains`, if given) answer `status`."""
        self._faults.append(Fault("status", count, path_contains, status, headers or {}))

    def fail_always(
        self, status: int = 503, path_contains: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        self._faults.append(Fault("status", None, path_contains, status, headers or {}))

    def reset_next(self, count: int | None, path_contains: str | None = None) -> None:
        """The next `count` matching requests (all with None) lose their connection halfway through the
        upload of their body."""
        self._faults.append(Fault("reset", count, path_contains))

    def stall_next(self, count: int | None, seconds: float, path_contains: str | None = None) -> None:
        """The next `count` matching requests (all with None) get no answer for `seconds`, then the
        connection closes."""
        self._faults.append(Fault("stall", count, path_contains, seconds=seconds))

    def heal(self) -> None:
        """Forget every fault injected so far: the Hub works again."""
        with self._lock:
            self._faults.clear()
        self.token_rejected = False

    def reject_token(self) -> None:
        """Answer 401 to every request, as the Hub does for a revoked or mistyped token."""
        self.token_rejected = True

    def requests_to(self, method: str, path_pattern: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and re.fullmatch(path_pattern, r.path)]

    # --- request handling (called from the server's threads) ---
    def record(self, request: Recorded) -> None:
        with self._lock:
            self.requests.append(request)

    def handle(self, request: Recorded, fault: Fault | None) -> tuple[int, dict[str, str], Any]:
        """The answer to a request, recorded; `fault` (of kind "status") is the failure it was given."""
        with self._lock:
            self.requests.append(request)
            if fault is not None:
                return (
                    fault.status,
                    {"X-Error-Message": "stand-in failure", **fault.headers},
                    {"error": "stand-in failure"},
                )
            if request.method == "GET" and request.path == "/api/agent-harnesses":
                # huggingface_hub fetches this registry once a day, with no token, to name the AI agent
                # in its User-Agent; the Hub serves it to anyone. Empty: no agent is detected.
                return 200, {}, {"standardEnvVars": [], "harnesses": {}}
            if self.token_rejected or not self._authorized(request.headers.get("authorization", "")):
                message = "Invalid credentials in Authorization header"
                return 401, {"X-Error-Message": message}, {"error": message}
            return self._route(request)

    def _authorized(self, header: str) -> bool:
        """The token as a bearer, or as user or password of Basic auth: what httpx sends instead when
        the endpoint's URL holds credentials (`http://hf_...@host`)."""
        if header == f"Bearer {self.token}":
            return True
        scheme, _, encoded = header.partition(" ")
        if scheme != "Basic":
            return False
        user, _, password = base64.b64decode(encoded).decode(errors="replace").partition(":")
        return self.token in (user, password)

    def take_fault(self, path: str) -> Fault | None:
        """The fault that the request to `path` gets, counted; None when it is answered normally."""
        with self._lock:
            for fault in self._faults:
                if fault.path_contains is not None and fault.path_contains not in path:
                    continue
                if fault.remaining is None:
                    return fault
                if fault.remaining > 0:
                    fault.remaining -= 1
                    return fault
        return None

    def _route(self, request: Recorded) -> tuple[int, dict[str, str], Any]:
        for method, pattern, handler in self._routes():
            match = re.fullmatch(pattern, request.path)
            if match and method == request.method:
                return handler(request, **match.groupdict())
        self.unrouted.append(request)
        return 404, {"X-Error-Message": "no such route in the stand-in"}, {"error": "not found"}

    def _routes(self):
        return (
            ("GET", r"/api/whoami-v2", self._whoami),
            ("POST", r"/api/repos/create", self._create_repo),
            ("GET", rf"/api/models/{_REPO}(?:/revision/{_REV})?", self._repo_info),
            ("POST", r"/api/validate-yaml", lambda request: (200, {}, {"errors": [], "warnings": []})),
            ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", self._preupload),
            ("GET", rf"/api/models/{_REPO}/tree/{_REV}(?:/.*)?", self._tree),
            ("POST", rf"/api/models/{_REPO}/commit/{_REV}", self._commit),
            ("POST", rf"/api/spaces/{_REPO}/variables", self._space_variable),
            ("POST", rf"/api/spaces/{_REPO}/pause", self._pause),
            ("GET", rf"/api/datasets/{_REPO}(?:/revision/{_REV})?", self._dataset_info),
            ("GET", rf"/api/datasets/{_REPO}/tree/{_REV}(?:/{_PATH})?", self._dataset_tree),
            ("POST", rf"/api/datasets/{_REPO}/paths-info/{_REV}", self._dataset_paths_info),
            ("GET", rf"/datasets/{_REPO}/resolve/{_REV}/{_PATH}", self._dataset_file),
            ("HEAD", rf"/datasets/{_REPO}/resolve/{_REV}/{_PATH}", self._dataset_file),
        )

    def _whoami(self, request: Recorded):
        return (
            200,
            {},
            {
                "type": "user",
                "name": self.user,
                "auth": {"accessToken": {"displayName": "stand-in", "role": self.role}},
            },
        )

    def _create_repo(self, request: Recorded):
        payload = json.loads(request.body)
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        if repo_id in self.repos:
            return (
                409,
                {"X-Error-Message": "You already created this model repo"},
                {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"},
            )
        self.repos[repo_id] = Repo()
        return 200, {}, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}

    def _missing_repo(self, repo: str):
        return (
            404,
            {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
            {"error": f"Repository {repo} not found"},
        )

    def _repo_info(self, request: Recorded, repo: str, rev: str | None = None):
        if repo not in self.repos:
            return self._missing_repo(repo)
        stored = self.repos[repo]
        return (
            200,
            {},
            {
                "id": repo,
                "modelId": repo,
                "sha": stored.head,
                "private": False,
                "siblings": [{"rfilename": path} for path in sorted(stored.files)],
            },
        )

    def _preupload(self, request: Recorded, repo: str, rev: str):
        if repo not in self.repos:
            return self._missing_repo(repo)
        files = json.loads(request.body)["files"]
        return 200, {}, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}

    def _tree(self, request: Recorded, repo: str, rev: str):
        if repo not in self.repos:
            return self._missing_repo(repo)
        return (
            200,
            {},
            [
                {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for path, data in sorted(self.repos[repo].files.items())
            ],
        )

    def _commit(self, request: Recorded, repo: str, rev: str):
        if repo not in self.repos:
            return self._missing_repo(repo)
        lines = [json.loads(line) for line in request.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return 400, {"X-Error-Message": "the commit must start with a header line"}, {"error": "bad commit"}
        files = dict(self.repos[repo].files)
        for line in lines[1:]:
            if line["key"] == "file":
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] == "deletedFile":
                files.pop(line["value"]["path"], None)
            elif line["key"] == "deletedFolder":
                prefix = line["value"]["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            else:
                return 400, {"X-Error-Message": f"the stand-in takes no {line['key']}"}, {"error": "bad commit"}
        oid = hashlib.sha1(request.body).hexdigest()
        header = lines[0]["value"]
        self.repos[repo].files = files
        self.repos[repo].commits.append(
            {"oid": oid, "summary": header.get("summary"), "description": header.get("description")}
        )
        return 200, {}, {"success": True, "commitOid": oid, "commitUrl": f"{self.endpoint}/{repo}/commit/{oid}"}

    def _space_variable(self, request: Recorded, repo: str):
        if repo not in self.spaces:
            return self._missing_repo(repo)
        payload = json.loads(request.body)
        self.spaces[repo].variables[payload["key"]] = payload["value"]
        return (
            200,
            {},
            {
                key: {"value": value, "updatedAt": "2025-01-01T00:00:00.000Z"}
                for key, value in self.spaces[repo].variables.items()
            },
        )

    def _pause(self, request: Recorded, repo: str):
        if repo not in self.spaces:
            return self._missing_repo(repo)
        self.spaces[repo].stage = "PAUSED"
        return 200, {}, {"stage": "PAUSED", "hardware": {"current": None, "requested": "cpu-basic"}}

    # --- dataset repositories ---
    def _dataset_at(self, repo: str, rev: str | None) -> tuple[Repo | None, tuple | None]:
        """The dataset and None, or None and the Hub's 404 for a missing repository or revision."""
        if repo not in self.datasets:
            return None, self._missing_repo(repo)
        stored = self.datasets[repo]
        if rev not in (None, "main", stored.head):
            message = f"Invalid rev id: {rev}"
            return None, (404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": message}, {"error": message})
        return stored, None

    @staticmethod
    def _missing_entry(path: str):
        return (
            404,
            {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"},
            {"error": f"Entry not found: {path}"},
        )

    def _dataset_info(self, request: Recorded, repo: str, rev: str | None = None):
        stored, error = self._dataset_at(repo, rev)
        if error:
            return error
        return (
            200,
            {},
            {
                "id": repo,
                "sha": stored.head,
                "private": True,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "cardData": _card_data(stored.files),
                "lastModified": "2025-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": path} for path in sorted(stored.files)],
            },
        )

    def _dataset_tree(self, request: Recorded, repo: str, rev: str, path: str | None = None):
        """The entries under `path` (the root when None): its children, or with ?recursive=true every
        file and folder below it. The Hub pages long listings; this one answers in one page."""
        stored, error = self._dataset_at(repo, rev)
        if error:
            return error
        entries = _entries(stored.files)
        folder = (path or "").strip("/")
        if folder and entries.get(folder, {}).get("type") != "directory":
            return self._missing_entry(folder)
        recursive = request.query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{folder}/" if folder else ""
        return (
            200,
            {},
            [
                entry
                for name, entry in sorted(entries.items())
                if name.startswith(prefix) and (recursive or "/" not in name[len(prefix) :])
            ],
        )

    def _dataset_paths_info(self, request: Recorded, repo: str, rev: str):
        """The entries of the asked `paths` (a form field, repeated) that exist; the others are left
        out, as the Hub does, and the client takes a missing one as not found."""
        stored, error = self._dataset_at(repo, rev)
        if error:
            return error
        entries = _entries(stored.files)
        asked = parse_qs(request.body.decode()).get("paths", [])
        return 200, {}, [entries[path.strip("/")] for path in asked if path.strip("/") in entries]

    def _dataset_file(self, request: Recorded, repo: str, rev: str, path: str):
        """A file's bytes, or with a Range header the asked part (206): pyarrow reads a parquet file
        through HfFileSystem by ranges, its footer first. ETag and X-Repo-Commit are what
        hf_hub_download keys its cache on."""
        stored, error = self._dataset_at(repo, rev)
        if error:
            return error
        if path not in stored.files:
            return self._missing_entry(path)
        data = stored.files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{_git_oid(data)}"',
            "X-Repo-Commit": stored.head,
        }
        wanted = _byte_range(request.headers.get("range"), len(data))
        if wanted is None:
            return 200, headers, data
        if wanted == ():
            return 416, {**headers, "Content-Range": f"bytes */{len(data)}"}, b""
        start, end = wanted
        return 206, {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}, data[start : end + 1]


def _git_oid(data: bytes) -> str:
    """The git blob id of `data`: the oid that the Hub gives a file that is not stored in LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _entries(files: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """Every file and every folder of a repository, by path, as the Hub's tree and paths-info give them."""
    entries: dict[str, dict[str, Any]] = {}
    for path, data in files.items():
        entries[path] = {"type": "file", "path": path, "size": len(data), "oid": _git_oid(data)}
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            folder = "/".join(parts[:depth])
            entries[folder] = {
                "type": "directory",
                "path": folder,
                "size": 0,
                "oid": hashlib.sha1(folder.encode()).hexdigest(),
            }
    return entries


def _card_data(files: dict[str, bytes]) -> dict[str, Any]:
    """README.md's YAML front matter, which the Hub returns as cardData (the `configs` among it)."""
    import yaml  # only dataset repositories need it

    match = re.match(rb"---\r?\n(.*?)\r?\n---", files.get("README.md", b""), re.S)
    return (yaml.safe_load(match.group(1)) or {}) if match else {}


def _byte_range(header: str | None, size: int) -> tuple[int, int] | tuple[()] | None:
    """The inclusive (start, end) that a `Range: bytes=...` header asks of `size` bytes; None to send
    the whole file (no header, or one the Hub would ignore too); () when it starts past the end (416)."""
    match = _RANGE.fullmatch((header or "").strip())
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # "bytes=-N": the last N bytes
        return (max(size - int(last), 0), size - 1) if int(last) and size else ()
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return ()
    return start, end


def point_datasets_at(hub: HubStandIn, monkeypatch: Any, home: Path) -> None:
    """Point huggingface_hub and datasets, in this process, at `hub`, online, with their caches under
    `home`. Both read HF_ENDPOINT, the offline switches and the cache folders once, when imported, so
    the variables are set for what reads them later and the constants they were read into are patched."""
    import datasets
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",  # hf_hub_download's URLs
        hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", hub.endpoint)
    monkeypatch.setattr(
        datasets.config, "HUB_DATASETS_URL", hub.endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"
    )
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    # Otherwise load_dataset counts a download with a HEAD to s3.amazonaws.com, outside the stand-in.
    monkeypatch.setenv("HF_UPDATE_DOWNLOAD_COUNTS", "false")
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
    # Otherwise load_dataset asks the dataset viewer at datasets-server.<HF_ENDPOINT's host> for the
    # configs' infos: a host name outside the stand-in, looked up in DNS.
    monkeypatch.setattr(datasets.config, "USE_PARQUET_EXPORT", False)


def _handler_for(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            url = urlsplit(self.path)
            fault = hub.take_fault(unquote(url.path))
            if fault is not None and fault.kind == "reset":
                length //= 2
            body = self.rfile.read(length) if length else b""
            request = Recorded(
                self.command,
                unquote(url.path),
                parse_qs(url.query),
                {k.lower(): v for k, v in self.headers.items()},
                body,
            )
            if fault is not None and fault.kind != "status":
                hub.record(request)
                self._fail_connection(fault)
                return
            status, headers, payload = hub.handle(request, fault)
            # Bytes are a file's content, sent as they are; anything else is the Hub's JSON.
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":  # HEAD: the headers of the GET, Content-Length included, no body
                self.wfile.write(data)

        def _fail_connection(self, fault: Fault) -> None:
            self.close_connection = True
            if fault.kind == "stall":
                time.sleep(fault.seconds)
            else:  # linger 0: closing sends a TCP reset, as a dropped connection or proxy does
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: tests read `hub.requests` instead."""

    return Handler


def main() -> int:
    token = sys.argv[1] if len(sys.argv) > 1 else "hf_standin_token"
    hub = HubStandIn(token=token)
    print(f"Hub stand-in at {hub.endpoint} (token {token!r}); Ctrl-C stops it", flush=True)
    try:
        hub.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
