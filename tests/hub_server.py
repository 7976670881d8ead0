"""A local stand-in for the Hugging Face Hub, speaking enough HTTP for huggingface_hub 2.x.

Two stdlib servers on ephemeral ports share one state: the "hub" answers the API
(`/api/models/{id}/revision/{rev}`, `/api/models/{id}/tree/{rev}`) and `/{id}/resolve/{rev}/{file}`
(HEAD and GET); large (LFS) files are redirected, like on huggingface.co, to a "CDN" on the other
port, which serves byte ranges. Every request is logged so tests can check what was asked for
(and that nothing else was, e.g. xet endpoints). `cut_off` drops one transfer mid-file;
`slow_down` trickles one; `serve_etag` and `listing_ids` make a hub that lies or says little.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".msgpack", ".onnx", ".pt")
#: huggingface_hub's download chunk in the tests (10 MB by default: more than a tiny file). It
#: writes whole chunks only, so a transfer cut off mid-file resumes at a chunk edge.
CHUNK = 64 * 1024
_LFS_POINTER_SIZE = 134


@dataclass(frozen=True)
class HubFile:
    """One file of a repo, with the ids the hub reports for it."""

    content: bytes

    @property
    def is_lfs(self) -> bool:
        return False

    @property
    def git_oid(self) -> str:
        """The git blob id: the hub's ETag for small files."""
        header = f"blob {len(self.content)}\0".encode()
        return hashlib.sha1(header + self.content, usedforsecurity=False).hexdigest()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass(frozen=True)
class LfsFile(HubFile):
    @property
    def is_lfs(self) -> bool:
        return True

    @property
    def git_oid(self) -> str:
        # The git blob of an LFS file is its small pointer file, not the content.
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
        return hashlib.sha1(f"blob {len(pointer)}\0{pointer}".encode(),
                            usedforsecurity=False).hexdigest()


@dataclass
class LoggedRequest:
    """One request as the fake hub answered it; `bytes_sent` counts body bytes."""

    method: str
    path: str
    status: int
    range_start: int | None = None
    bytes_sent: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _CutOff:
    after_bytes: int
    then_fail: int


class FakeHub:
    """Repos in memory, served over HTTP. Use as a context manager or call start/stop."""

    def __init__(self) -> None:
        self.repos: dict[str, tuple[str, dict[str, HubFile]]] = {}
        self.requests: list[LoggedRequest] = []
        self._cut_offs: dict[str, _CutOff] = {}
        self._slow: dict[str, int] = {}
        self._etags: dict[str, str] = {}
        #: False: the listing gives no content ids (sizes only), as some mirrors.
        self.listing_ids = True
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []

    # -- content ------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Publish a repo at one commit; returns the commit sha."""
        entries = {path: (LfsFile if path.endswith(LFS_SUFFIXES) else HubFile)(content)
                   for path, content in files.items()}
        listing = "".join(f"{p}:{f.sha256}\n" for p, f in sorted(entries.items()))
        sha = hashlib.sha1(f"{repo_id}\n{listing}".encode(), usedforsecurity=False).hexdigest()
        self.repos[repo_id] = (sha, entries)
        return sha

    def add_folder(self, repo_id: str, folder: Path, extra: dict[str, bytes] | None = None) -> str:
        files = {p.relative_to(folder).as_posix(): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.add_repo(repo_id, {**files, **(extra or {})})

    def slow_down(self, filename: str, bytes_per_second: int) -> None:
        """Send `filename` at about this rate, so a test can interrupt a transfer midway."""
        self._slow[filename] = bytes_per_second

    def serve_etag(self, filename: str, etag: str) -> None:
        """Answer `etag` (unquoted text) as `filename`'s ETag, whatever its content is."""
        self._etags[filename] = etag

    def cut_off(self, filename: str, after_bytes: int, *, then_fail: int = 0) -> None:
        """The next transfer of `filename` stops after `after_bytes` bytes and the connection
        drops; the `then_fail` transfers after it are answered 503."""
        self._cut_offs[filename] = _CutOff(after_bytes, then_fail)

    # -- inspection ---------------------------------------------------------------------------

    def downloads(self, filename: str) -> list[LoggedRequest]:
        """The GETs of `filename`'s content (small files on the hub, LFS files on the CDN)."""
        return [r for r in self.requests if r.method == "GET"
                and (r.path.endswith(f"/resolve/{_any_rev(r.path)}/{filename}")
                     or (r.path.startswith("/cdn/") and r.path.endswith(f"/{filename}")))]

    def unexpected(self) -> list[LoggedRequest]:
        """Requests the fake hub had no route for (would mean the client tried something new)."""
        return [r for r in self.requests
                if r.status == 404 and "X-Error-Code" not in r.response_headers]

    # -- server -------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_port}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_port}"

    def start(self) -> FakeHub:
        for _ in range(2):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                             daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _log(self, request: LoggedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _take_cut_off(self, filename: str) -> tuple[int | None, bool]:
        """(bytes to send before dropping, or None) and whether to answer 503 instead."""
        with self._lock:
            cut = self._cut_offs.get(filename)
            if cut is None:
                return None, False
            if cut.after_bytes >= 0:
                after, cut.after_bytes = cut.after_bytes, -1
                return after, False
            if cut.then_fail > 0:
                cut.then_fail -= 1
                return None, True
            del self._cut_offs[filename]
            return None, False


def _any_rev(path: str) -> str:
    return path.split("/resolve/", 1)[1].split("/", 1)[0] if "/resolve/" in path else ""


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    """A handler class bound to one FakeHub (http.server makes one handler per request)."""
    return type("FakeHubHandler", (_HubHandler,), {"hub": hub})


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, format: str, *args: object) -> None:
        return  # keep test output clean

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    # -- routing ------------------------------------------------------------------------------

    def _route(self, *, head: bool) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        if path.startswith("/api/models/") and not head:
            self._api(path.removeprefix("/api/models/"), query)
        elif path.startswith("/cdn/"):
            self._cdn(path, head=head)
        elif "/resolve/" in path:
            self._resolve(path, head=head)
        else:
            self._answer(404, b"", {})

    def _api(self, rest: str, query: dict[str, list[str]]) -> None:
        for marker, handler in (("/revision/", self._repo_info), ("/tree/", self._tree)):
            if marker in rest:
                repo_id, _, tail = rest.partition(marker)
                revision = tail.split("/", 1)[0]
                repo = self._find(repo_id, revision)
                if repo is not None:
                    handler(repo_id, repo, query)
                return
        self._answer(404, b"", {})

    def _repo_info(self, repo_id: str, repo: tuple[str, dict[str, HubFile]],
                   query: dict[str, list[str]]) -> None:
        sha, files = repo
        with_blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = [_sibling(path, f, with_blobs, self.hub.listing_ids)
                    for path, f in sorted(files.items())]
        body = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                "tags": ["diffusers"], "library_name": "diffusers", "siblings": siblings}
        self._json(body, {"X-Repo-Commit": sha})

    def _tree(self, repo_id: str, repo: tuple[str, dict[str, HubFile]],
              query: dict[str, list[str]]) -> None:
        sha, files = repo
        entries = []
        for path, f in sorted(files.items()):
            entry = {"type": "file", "path": path, "size": len(f.content), "oid": f.git_oid}
            if f.is_lfs:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.content),
                                "pointerSize": _LFS_POINTER_SIZE}
            entries.append(entry)
        self._json(entries, {"X-Repo-Commit": sha})

    def _resolve(self, path: str, *, head: bool) -> None:
        repo_id, _, tail = path.lstrip("/").partition("/resolve/")
        revision, _, filename = tail.partition("/")
        repo = self._find(repo_id, revision)
        if repo is None:
            return
        sha, files = repo
        hub_file = files.get(filename)
        if hub_file is None:
            self._answer(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
            return
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        etag = self.hub._etags.get(filename)
        if hub_file.is_lfs:
            headers.update({
                "Location": f"{self.hub.cdn}/cdn/{hub_file.sha256}/{quote(filename)}",
                "X-Linked-Etag": f'"{etag or hub_file.sha256}"',
                "X-Linked-Size": str(len(hub_file.content)),
                "ETag": f'"{hub_file.git_oid}"',  # the pointer's: clients must prefer X-Linked-Etag
            })
            self._answer(302, b"", headers, head=head)
            return
        headers["ETag"] = f'"{etag or hub_file.git_oid}"'
        self._send_content(filename, hub_file.content, headers, head=head)

    def _cdn(self, path: str, *, head: bool) -> None:
        _, _, sha256, filename = path.split("/", 3)
        for _sha, files in self.hub.repos.values():
            for name, hub_file in files.items():
                if hub_file.sha256 == sha256 and name == filename:
                    self._send_content(filename, hub_file.content, {"ETag": f'"{sha256}"'},
                                       head=head)
                    return
        self._answer(404, b"", {})

    def _find(self, repo_id: str, revision: str) -> tuple[str, dict[str, HubFile]] | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._answer(401, b"", {"X-Error-Code": "RepoNotFound",
                                    "X-Error-Message": "Repository not found"})
            return None
        if revision not in ("main", repo[0]):
            self._answer(404, b"", {"X-Error-Code": "RevisionNotFound",
                                    "X-Error-Message": "Invalid rev id"})
            return None
        return repo

    # -- responses ----------------------------------------------------------------------------

    def _send_content(self, filename: str, content: bytes, headers: dict[str, str], *,
                      head: bool) -> None:
        start = _range_start(self.headers.get("Range"))
        if head:
            self._answer(200, content, headers, head=True)
            return
        cut_after, fail = self.hub._take_cut_off(filename)
        if fail:
            self._answer(503, b"", {}, range_start=start)
            return
        status, body = 200, content
        if start is not None and 0 < start < len(content):
            status, body = 206, content[start:]
            span = f"bytes {start}-{len(content) - 1}/{len(content)}"
            headers = {**headers, "Content-Range": span}
        rate = self.hub._slow.get(filename)
        if rate:
            self._trickle(status, body, headers, rate, start)
        elif cut_after is None:
            self._answer(status, body, headers, range_start=start)
        else:
            self._drop_after(status, body, headers, cut_after, start)

    def _trickle(self, status: int, body: bytes, headers: dict[str, str], rate: int,
                 range_start: int | None) -> None:
        """Send the body in small pieces at about `rate` bytes a second."""
        self._headers(status, {**headers, "Content-Length": str(len(body))})
        piece = max(1, rate // 20)
        sent = 0
        try:
            for offset in range(0, len(body), piece):
                self.wfile.write(body[offset:offset + piece])
                self.wfile.flush()
                sent += len(body[offset:offset + piece])
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away mid-transfer, as the test wants
        self._record(status, range_start, sent, headers)

    def _drop_after(self, status: int, body: bytes, headers: dict[str, str], after: int,
                    range_start: int | None) -> None:
        """Promise the whole body, send `after` bytes, then drop the connection."""
        self._headers(status, {**headers, "Content-Length": str(len(body))})
        self.wfile.write(body[:after])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)
        self._record(status, range_start, after)

    def _json(self, data: object, headers: dict[str, str]) -> None:
        body = json.dumps(data).encode()
        self._answer(200, body, {**headers, "Content-Type": "application/json"})

    def _answer(self, status: int, body: bytes, headers: dict[str, str], *, head: bool = False,
                range_start: int | None = None) -> None:
        self._headers(status, {**headers, "Content-Length": str(len(body))})
        if not head:
            self.wfile.write(body)
        self._record(status, range_start, 0 if head else len(body), headers)

    def _headers(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _record(self, status: int, range_start: int | None, sent: int,
                headers: dict[str, str] | None = None) -> None:
        self.hub._log(LoggedRequest(self.command, unquote(urlsplit(self.path).path), status,
                                    range_start, sent, dict(headers or {})))


def _sibling(path: str, hub_file: HubFile, with_blobs: bool, ids: bool) -> dict[str, object]:
    """A `siblings` entry; sizes and ids only when asked with `?blobs=true`, as on the hub (and
    no ids at all from a mirror that gives none)."""
    if not with_blobs:
        return {"rfilename": path}
    entry: dict[str, object] = {"rfilename": path, "size": len(hub_file.content)}
    if not ids:
        return entry
    entry["blobId"] = hub_file.git_oid
    if hub_file.is_lfs:
        entry["lfs"] = {"sha256": hub_file.sha256, "size": len(hub_file.content),
                        "pointerSize": _LFS_POINTER_SIZE}
    return entry


def _range_start(header: str | None) -> int | None:
    """The start of a `bytes=N-` range (the only form huggingface_hub sends)."""
    if not header or not header.startswith("bytes="):
        return None
    return int(header.removeprefix("bytes=").split("-", 1)[0])


def point_hub_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path) -> None:
    """Make huggingface_hub (and vedit) use `endpoint` and a cache under `home`.

    huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE and the token path into
    `huggingface_hub.constants` when imported, builds `HUGGINGFACE_CO_URL_TEMPLATE` from the
    endpoint then, and binds its module-level functions (`huggingface_hub.model_info`...) to an
    `HfApi` made at import; vedit reads the environment at call time. All are set here."""
    from huggingface_hub import constants, hf_api

    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
           "HF_HUB_ETAG_TIMEOUT": "5"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn on HF_HUB_OFFLINE, both as huggingface_hub read it at import and as set now."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def closed_port_endpoint() -> str:
    """An http URL on a local port nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
