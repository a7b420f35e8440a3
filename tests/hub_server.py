"""A small Hugging Face Hub-protocol server for tests: standard library only, loopback only.

It answers the requests the real ``huggingface_hub`` client (2.4) and ``DiffusionPipeline.from_pretrained``
make for model repos (the sequence huggingface_hub 0.34+ sends): create_repo, repo/model info,
preupload, git-LFS batch/PUT/verify (sha256 checked), NDJSON commits, validate-yaml, tree listings,
HEAD/GET resolve and whoami-v2. Writes need ``Authorization: Bearer <token>`` of the repo's owner; private
repos are invisible (404) to anyone else. File contents live on disk under a temporary directory, keyed
by sha256; repo histories are kept in memory. ``fail()`` makes chosen requests fail, for tests of
interrupted pushes. Xet is not spoken: clients must run with ``HF_HUB_DISABLE_XET=1``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Files stored through git-LFS (the Hub decides this from .gitattributes and size; this is its default set).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".npy", ".npz", ".png", ".jpg", ".jpeg")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
STEPS = ("create", "preupload", "lfs_batch", "lfs_put", "lfs_verify", "commit", "resolve")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Entry:
    """One file of one commit."""

    size: int
    sha256: str
    lfs: bool
    blob_id: str  # git's object id: of the content, or of the LFS pointer for LFS files


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    commits: dict  # commit oid -> {path: Entry}
    head: str  # commit oid of main
    created: str
    lfs_oids: set  # LFS objects uploaded to this repo (the Hub's LFS store is per repo)


@dataclass
class Fault:
    step: str
    nth: int  # the first request of `step` (1-based) that fails
    status: int | None  # None: answer normally (after `delay`)
    times: int  # how many consecutive requests fail
    truncate: bool  # lfs_put only: keep half the body, so the sha256 check rejects it
    delay: float  # seconds to wait before answering


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **body):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.body = status, message, code, headers or {}, body


class HubServer:
    """``HubServer().start()``; ``.endpoint``, ``.token`` (owner ``.user``), ``.fail(...)``, ``.stop()``."""

    def __init__(self, user: str = "user", token: str | None = None):
        self.user = user
        self.token = token or "hf_test_" + secrets.token_hex(12)
        self.tokens = {self.token: user}
        self.root = Path(tempfile.mkdtemp(prefix="ddpm_plus_hub_"))
        (self.root / "blobs").mkdir()
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) of every request served
        self._faults: list[Fault] = []
        self._counts: dict[str, int] = {}
        self._tickets: dict = {}  # LFS upload ticket -> (repo, oid); stands in for a pre-signed S3 URL
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None

    # ----- lifecycle and test controls -----
    def start(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True, name="hub-server").start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def fail(
        self,
        step: str,
        *,
        nth: int = 1,
        status: int | None = 500,
        times: int = 1,
        truncate: bool = False,
        delay: float = 0.0,
    ):
        """Make the `nth` (and the next `times`-1) requests of `step` fail with `status` (counted from now).

        `step` is one of STEPS. With ``truncate=True`` (lfs_put only) the body is cut in half instead,
        as an interrupted upload would be, and the server's own sha256 check answers 400. ``delay`` waits
        that long first; ``status=None`` then serves the request normally (a slow server).
        """
        if step not in STEPS:
            raise ValueError(f"step must be one of {STEPS}, got {step!r}")
        if truncate and step != "lfs_put":
            raise ValueError("truncate=True only applies to step='lfs_put'")
        with self._lock:
            self._counts[step] = 0
            self._faults.append(Fault(step, nth, status, times, truncate, delay))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._counts.clear()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The server's own view of a repo's files (independent of the client), path -> content."""
        with self._lock:
            repo = self.repos[repo_id]
            snapshot = repo.commits[repo.head if revision == "main" else revision]
            return {p: self._blob(e.sha256).read_bytes() for p, e in snapshot.items()}

    # ----- storage helpers -----
    def _blob(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def _store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self._blob(sha).exists():
            tmp = self._blob(sha + f".tmp{threading.get_ident()}")
            tmp.write_bytes(data)
            tmp.replace(self._blob(sha))
        return sha

    def _entry(self, data: bytes) -> Entry:  # a regular (non-LFS) file
        return Entry(len(data), self._store(data), False, git_blob_sha1(data))

    def _new_commit(self, repo: Repo, files: dict, summary: str) -> str:
        listing = json.dumps(sorted((p, e.sha256) for p, e in files.items()))
        oid = hashlib.sha1(f"{repo.head}\n{summary}\n{listing}\n{time.time_ns()}".encode()).hexdigest()
        repo.commits[oid], repo.head = files, oid
        return oid

    def _check_fault(self, step: str) -> Fault | None:
        with self._lock:
            self._counts[step] = self._counts.get(step, 0) + 1
            for fault in self._faults:
                if fault.step == step and fault.nth <= self._counts[step] < fault.nth + fault.times:
                    return fault
        return None

    # ----- access control -----
    def _user(self, headers) -> str | None:
        auth = headers.get("Authorization", "")
        return self.tokens.get(auth[7:].strip()) if auth.startswith("Bearer ") else None

    def _require_user(self, headers) -> str:
        auth = headers.get("Authorization", "")
        user = self._user(headers)
        if user is None:
            msg = "Invalid credentials in Authorization header" if auth else "Authorization header is required"
            raise HubError(401, msg)
        return user

    def _repo(self, repo_id: str, headers, write: bool = False) -> Repo:
        user = self._require_user(headers) if write else self._user(headers)
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        if write and user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _resolve(self, repo: Repo, rev: str) -> tuple[str, dict]:
        oid = repo.head if rev == "main" else rev
        if oid not in repo.commits:
            raise HubError(404, f"Revision {rev} not found in {repo.repo_id}", "RevisionNotFound")
        return oid, repo.commits[oid]

    # ----- endpoints: (headers, query, body, **url groups) -> (status, payload | (bytes, headers)) -----
    def whoami(self, headers, query, body):
        user = self._require_user(headers)
        return 200, {
            "type": "user",
            "name": user,
            "fullname": user,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
        }

    def create(self, headers, query, body):
        user = self._require_user(headers)
        req = json.loads(body or b"{}")
        if req.get("type", "model") != "model":
            raise HubError(400, "this test server only hosts model repos")
        namespace, name = req.get("organization") or user, req.get("name", "")
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a repo under {namespace}")
        if not re.fullmatch(r"[\w.-]{1,96}", name):
            raise HubError(400, f"Invalid repo name {name!r}")
        repo_id = f"{namespace}/{name}"
        private = req.get("visibility") == "private" or bool(req.get("private"))
        with self._lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo", url=f"{self.endpoint}/{repo_id}")
            created = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
            repo = Repo(repo_id, user, private, {}, "0" * 40, created, set())
            self._new_commit(repo, {".gitattributes": self._entry(GITATTRIBUTES)}, "initial commit")
            self.repos[repo_id] = repo
        return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id}

    def validate_yaml(self, headers, query, body):
        content = json.loads(body).get("content", "")
        if content.startswith("---") and "\n---" not in content[3:]:
            raise HubError(400, "YAML metadata block is not closed")
        return 200, {"errors": [], "warnings": []}

    def info(self, headers, query, body, repo, rev=None):
        r = self._repo(repo, headers)
        oid, files = self._resolve(r, rev or "main")
        siblings = [{"rfilename": p, "size": e.size, "blobId": e.blob_id} for p, e in sorted(files.items())]
        return 200, {
            "_id": oid[:24],
            "id": r.repo_id,
            "modelId": r.repo_id,
            "author": r.owner,
            "sha": oid,
            "private": r.private,
            "gated": False,
            "disabled": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "createdAt": r.created,
            "lastModified": r.created,
            "siblings": siblings,
        }

    def preupload(self, headers, query, body, repo, rev):
        r = self._repo(repo, headers, write=True)
        _, files = self._resolve(r, rev)
        out = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].lower().endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
            old = files.get(f["path"])
            oid = None if old is None else (old.sha256 if old.lfs else old.blob_id)
            out.append(
                {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        return 200, {"files": out}

    def lfs_batch(self, headers, query, body, repo):
        r = self._repo(repo, headers, write=True)
        req = json.loads(body)
        if req.get("operation") != "upload":
            raise HubError(400, "only the upload operation is supported")
        objects = []
        for obj in req["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in r.lfs_oids:
                ticket = secrets.token_hex(16)
                with self._lock:
                    self._tickets[ticket] = (r, obj["oid"])
                item["actions"] = {
                    "upload": {"href": f"{self.endpoint}/_lfs/{obj['oid']}?ticket={ticket}"},
                    "verify": {"href": f"{self.endpoint}/{repo}.git/info/lfs/objects/verify"},
                }
            objects.append(item)
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_put(self, headers, query, body, oid, fault=None):
        with self._lock:
            repo, expected = self._tickets.pop(query.get("ticket", [""])[0], (None, None))
        if expected != oid:
            raise HubError(403, "upload URL is invalid or was already used")
        if fault is not None and fault.truncate:
            body = body[: len(body) // 2]
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"sha256 of the uploaded body does not match {oid} ({len(body)} bytes received)")
        self._store(body)
        with self._lock:
            repo.lfs_oids.add(oid)
        return 200, {}

    def lfs_verify(self, headers, query, body, repo):
        r = self._repo(repo, headers, write=True)
        req = json.loads(body)
        if req["oid"] not in r.lfs_oids or self._blob(req["oid"]).stat().st_size != req["size"]:
            raise HubError(404, f"LFS object {req['oid']} was not uploaded")
        return 200, {}

    def commit(self, headers, query, body, repo, rev):
        r = self._repo(repo, headers, write=True)
        if query.get("create_pr"):
            raise HubError(400, "pull requests are not supported by this test server")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        with self._lock:
            parent, files = self._resolve(r, rev)
            if header.get("parentCommit") not in (None, parent):
                raise HubError(412, "parentCommit is not the head of the branch")
            files = dict(files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = self._entry(base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    blob = self._blob(value["oid"])
                    if value["oid"] not in r.lfs_oids or blob.stat().st_size != value.get("size", blob.stat().st_size):
                        raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    size, oid = blob.stat().st_size, value["oid"]
                    files[value["path"]] = Entry(size, oid, True, git_blob_sha1(lfs_pointer(oid, size)))
                elif key == "deletedFile":
                    files.pop(value["path"])
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(prefix)}
                else:
                    raise HubError(400, f"unsupported commit operation {key!r}")
            oid = self._new_commit(r, files, header.get("summary", ""))
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.endpoint}/{repo}/commit/{oid}"}

    def tree(self, headers, query, body, repo, rev, path=None):
        r = self._repo(repo, headers)
        _, files = self._resolve(r, rev)
        base = (path or "").strip("/")
        prefix = base + "/" if base else ""
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        under = {p: e for p, e in files.items() if p.startswith(prefix)}
        if base and not under:
            raise HubError(404, f"{base} does not exist in {repo}", "EntryNotFound")
        entries, folders = [], set()
        for p, e in sorted(under.items()):
            parts = p[len(prefix) :].split("/")
            for i in range(1, len(parts)):
                if recursive or i == 1:
                    folders.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                item = {"type": "file", "oid": e.blob_id, "size": e.size, "path": p}
                if e.lfs:
                    item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
                entries.append(item)
        dirs = [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "path": f} for f in sorted(folders)]
        return 200, dirs + entries

    def resolve(self, headers, query, body, repo, rev, path):
        r = self._repo(repo, headers)
        oid, files = self._resolve(r, rev)
        entry = files.get(path)
        if entry is None:
            raise HubError(404, f"{path} does not exist in {repo}", "EntryNotFound", {"X-Repo-Commit": oid})
        out = {
            "X-Repo-Commit": oid,
            "ETag": f'"{entry.sha256 if entry.lfs else entry.blob_id}"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        if entry.lfs:
            out.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        data = self._blob(entry.sha256).read_bytes()
        status, match = 200, re.fullmatch(r"bytes=(\d+)-(\d*)", headers.get("Range", ""))
        if match:
            start, end = int(match[1]), int(match[2] or len(data) - 1)
            out["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
            status, data = 206, data[start : end + 1]
        return status, (data, out)


REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [  # (methods, raw path pattern, endpoint name, fault step)
    (("GET",), r"/api/whoami-v2", "whoami", None),
    (("POST",), r"/api/repos/create", "create", "create"),
    (("POST",), r"/api/validate-yaml", "validate_yaml", None),
    (("GET",), rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", "info", None),
    (("POST",), rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload", "preupload"),
    (("POST",), rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit", "commit"),
    (("GET",), rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree", None),
    (("POST",), rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch", "lfs_batch"),
    (("POST",), rf"/{REPO}\.git/info/lfs/objects/verify", "lfs_verify", "lfs_verify"),
    (("PUT",), r"/_lfs/(?P<oid>[0-9a-f]{64})", "lfs_put", "lfs_put"),
    (("GET", "HEAD"), rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve", "resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer

    def log_message(self, format, *args):  # keep pytest output clean; the hub records requests itself
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                chunk = self.rfile.read(size + 2)[:size]  # chunk data + CRLF
                if size == 0:
                    while self.rfile.readline().strip():  # optional trailers
                        pass
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload, extra: dict | None = None) -> None:
        if isinstance(payload, tuple):
            data, headers = payload
        else:
            data, headers = json.dumps(payload).encode(), {"Content-Type": "application/json"}
        headers = {**headers, **(extra or {})}
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.hub.requests.append((self.command, self.path, status))

    def _dispatch(self) -> None:
        body = self._body()  # always read the whole body first, so the connection stays usable
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        for methods, pattern, name, step in ROUTES:
            match = re.fullmatch(pattern, url.path)
            if not match or self.command not in methods:
                continue
            groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            try:
                fault = self.hub._check_fault(step) if step else None
                if fault is not None:
                    time.sleep(fault.delay)
                    if fault.status is not None and not fault.truncate:
                        raise HubError(fault.status, f"injected failure of {step} (test fault)")
                if name == "lfs_put":
                    groups["fault"] = fault
                status, payload = getattr(self.hub, name)(self.headers, query, body, **groups)
                self._send(status, payload)
            except HubError as err:
                headers = {"X-Error-Message": err.message, **err.headers}
                if err.code:
                    headers["X-Error-Code"] = err.code
                self._send(err.status, {"error": err.message, **err.body}, headers)
            return
        self._send(404, {"error": f"no route for {self.command} {url.path}"}, {"X-Error-Message": "not found"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch
