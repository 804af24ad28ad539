"""A local stand-in for the Hugging Face Hub, for tests of the real ``huggingface_hub`` client.

It speaks the subset of the Hub's HTTP API that the client (2.x) uses to create repos, push
commits (preupload, LFS batch/upload/verify, NDJSON commit, README validation), manage branches
and tags, list trees and refs, and download files (``resolve``), as described in
``HUB_PROTOCOL.md``. It runs in a thread on ``127.0.0.1``, port 0, stores blobs on disk (one
content-addressed folder per repo) and keeps a commit history per branch. Authentication is by
``Authorization: Bearer <token>`` against a table of users; private repos answer 401 (anonymous)
or 404 (another user) with ``X-Error-Code: RepoNotFound``, an unknown token 401 with the Hub's
``Invalid credentials in Authorization header`` message, as the real Hub does. A gated repo shows
its info and file list to anyone, but its files only to users granted access (401 anonymous, 403
otherwise, ``X-Error-Code: GatedRepo``). ``paths-info`` answers what ``HfFileSystem.info`` asks,
and :meth:`HubServer.delete_repo` makes a repo disappear (as if deleted on the Hub). With
``basic_auth=(user, password)`` it also stands for a mirror behind a proxy that takes HTTP Basic
credentials (an endpoint ``http://user:password@host``): a request carrying exactly those acts as
anonymous. Every request is
appended to :attr:`HubServer.log` so that tests can assert on what the client did; a request
that hits a bug of this server is answered 400 (not 5xx, which the client would retry) and also
kept in :attr:`HubServer.bugs`, which tests check stays empty.

Usage::

    with HubServer(tmp_path, users={"hf_alice": "alice"}, orgs={"org": {"alice"}}) as hub:
        HfApi(endpoint=hub.endpoint, token="hf_alice").create_repo("org/x")
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD = 10 * 1024 * 1024
DEFAULT_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.onnx filter=lfs diff=lfs merge=lfs -text\n"
    b"*.onnx_data filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.gguf filter=lfs diff=lfs merge=lfs -text\n"
)
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
VALID_RELATIONS = ("adapter", "merge", "quantized", "finetune")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: ``sha1(b"blob <len>\\0" + data)``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass
class Entry:
    """A file in a commit's tree."""

    sha256: str
    size: int
    lfs: bool

    def tree_oid(self, data: bytes | None = None) -> str:
        if self.lfs:
            return git_blob_sha1(lfs_pointer(self.sha256, self.size))
        assert data is not None
        return git_blob_sha1(data)


@dataclass
class Commit:
    oid: str
    parent: str | None
    tree: dict[str, Entry]
    summary: str


@dataclass
class Repo:
    repo_type: str  # "models", "datasets", "spaces"
    repo_id: str
    private: bool
    root: Path
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    #: gated: files readable only by the users in ``granted`` (the namespace's writers always)
    gated: bool = False
    granted: set[str] = field(default_factory=set)

    def blob_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256[:2] / sha256

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).exists()

    def put_blob(self, data: bytes) -> str:
        oid = hashlib.sha256(data).hexdigest()
        path = self.blob_path(oid)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp-" + secrets.token_hex(4))
            tmp.write_bytes(data)
            tmp.replace(path)
        return oid

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and rev in self.commits:
            return rev
        return None

    def save_meta(self) -> None:
        meta = {
            "repo_type": self.repo_type,
            "repo_id": self.repo_id,
            "private": self.private,
            "branches": self.branches,
            "tags": self.tags,
            "commits": {
                c.oid: {"parent": c.parent, "summary": c.summary, "tree": {p: [e.sha256, e.size, e.lfs] for p, e in c.tree.items()}}
                for c in self.commits.values()
            },
        }
        (self.root / "meta.json").write_text(json.dumps(meta, indent=1))


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.body = body


class HubServer:
    """An in-process Hub over loopback; use as a context manager (starts and stops the thread)."""

    def __init__(self, root: Path, users: dict[str, str] | None = None, orgs: dict[str, set[str]] | None = None,
                 basic_auth: tuple[str, str] | None = None) -> None:
        self.root = Path(root)
        self.basic_auth = basic_auth
        self.root.mkdir(parents=True, exist_ok=True)
        self.users = dict(users or {})  # token -> user name
        self.orgs = {k: set(v) for k, v in (orgs or {}).items()}  # org -> members
        self.repos: dict[tuple[str, str], Repo] = {}
        self.log: list[dict[str, Any]] = []
        #: requests that hit a bug of this server (answered 400); kept across :meth:`clear_log`
        self.bugs: list[dict[str, Any]] = []
        self._uploads: dict[str, tuple[Repo, str, int]] = {}  # secret -> (repo, oid, size)
        self._lock = threading.RLock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # -- helpers for tests ----------------------------------------------------------------
    def requests(self, method: str | None = None, contains: str | None = None) -> list[dict[str, Any]]:
        """Logged requests, filtered by method and a substring of the path."""
        with self._lock:
            return [r for r in self.log if (method is None or r["method"] == method) and (contains is None or contains in r["path"])]

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    def repo(self, repo_id: str, repo_type: str = "models") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def head_tree(self, repo_id: str, branch: str = "main", repo_type: str = "models") -> dict[str, Entry]:
        repo = self.repo(repo_id, repo_type)
        return repo.commits[repo.branches[branch]].tree

    def file_bytes(self, repo_id: str, path: str, branch: str = "main", repo_type: str = "models") -> bytes:
        repo = self.repo(repo_id, repo_type)
        return repo.read_blob(self.head_tree(repo_id, branch, repo_type)[path].sha256)

    def delete_repo(self, repo_id: str, repo_type: str = "models") -> None:
        """Remove a repo: every later request for it answers as for a repo that never existed."""
        with self._lock:
            del self.repos[(repo_type, repo_id)]

    def seed_repo(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", private: bool = False,
                  lfs_suffixes: tuple[str, ...] = (".safetensors",), repo_type: str = "models", gated: bool = False,
                  granted: set[str] | None = None) -> str:
        """Make ``branch`` of ``repo_id`` (created if needed) hold exactly ``files`` (path → bytes)
        plus ``.gitattributes``, in one commit written straight into the store; returns the commit.

        For malicious-repo tests: no path is checked, so a repo can hold what no client would
        push (paths that mirror absolute paths, files a manifest does not list, wrong folders).
        """
        with self._lock:
            repo = self.repos.get((repo_type, repo_id)) or self.create_repo(repo_type, repo_id, private)
            repo.gated, repo.granted = gated, set(granted or ())
            tree = {".gitattributes": Entry(repo.put_blob(DEFAULT_GITATTRIBUTES), len(DEFAULT_GITATTRIBUTES), False)}
            for path, data in files.items():
                tree[path] = Entry(repo.put_blob(data), len(data), path.endswith(lfs_suffixes))
            oid = self.new_commit(repo, repo.branches.get(branch), tree, "seeded")
            repo.branches[branch] = oid
            return oid

    # -- auth -----------------------------------------------------------------------------
    def user_for(self, authorization: str | None) -> str | None:
        """The user a request acts as; raises 401 for an unknown token."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "basic" and self.basic_auth is not None:
            if token.strip() == base64.b64encode(":".join(self.basic_auth).encode()).decode():
                return None  # the proxy's credentials: anonymous behind it
        if scheme.lower() != "bearer" or token.strip() not in self.users:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.users[token.strip()]

    def can_write_ns(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or user in self.orgs.get(namespace, set()))

    def get_repo(self, repo_type: str, repo_id: str, user: str | None, write: bool = False) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        visible = repo is not None and (not repo.private or self.can_write_ns(user, repo_id.split("/")[0]))
        if not visible:
            status = 401 if user is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        assert repo is not None
        if write and not self.can_write_ns(user, repo_id.split("/")[0]):
            if user is None:
                raise HubError(401, "You must be authenticated to write to this repository")
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def check_gate(self, repo: Repo, user: str | None) -> None:
        """Refuse the files of a gated repo to a user not granted access, as the Hub does."""
        if not repo.gated or user in repo.granted or self.can_write_ns(user, repo.repo_id.split("/")[0]):
            return
        kind = REPO_TYPES[repo.repo_type]
        if user is None:
            raise HubError(401, f"Access to {kind} {repo.repo_id} is restricted. You must have access to it and be authenticated "
                                "to access it. Please log in.", "GatedRepo")
        raise HubError(403, f"Access to {kind} {repo.repo_id} is restricted and you are not in the authorized list. "
                            f"Visit {self.endpoint}/{repo.repo_id} to ask for access.", "GatedRepo")

    def new_commit(self, repo: Repo, parent: str | None, tree: dict[str, Entry], summary: str) -> str:
        with self._lock:
            self._counter += 1
            blob = json.dumps([parent, summary, self._counter, sorted((p, e.sha256) for p, e in tree.items())]).encode()
            oid = hashlib.sha1(blob).hexdigest()
            repo.commits[oid] = Commit(oid, parent, tree, summary)
            return oid

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        ns, name = repo_id.split("/")
        repo = Repo(repo_type, repo_id, private, self.root / repo_type / ns / name)
        repo.root.mkdir(parents=True, exist_ok=True)
        oid = repo.put_blob(DEFAULT_GITATTRIBUTES)
        first = self.new_commit(repo, None, {".gitattributes": Entry(oid, len(DEFAULT_GITATTRIBUTES), False)}, "initial commit")
        repo.branches["main"] = first
        repo.save_meta()
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def lfs_patterns(self, repo: Repo, tree: dict[str, Entry]) -> list[str]:
        entry = tree.get(".gitattributes")
        if entry is None:
            return []
        pats = []
        for line in repo.read_blob(entry.sha256).decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) > 1 and "filter=lfs" in parts[1:]:
                pats.append(parts[0])
        return pats


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    # -- plumbing -------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                line = self.rfile.readline().strip()
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._status = status

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _handle(self) -> None:
        self._status = 0
        split = urlsplit(self.path)
        self._query = parse_qs(split.query)
        self._segments = [unquote(s) for s in split.path.split("/")[1:]]
        self._raw = split.path
        entry: dict[str, Any] = {"method": self.command, "path": split.path, "query": split.query, "user": None,
                                 "authorized": "Authorization" in self.headers}
        try:
            self._payload = self._body()  # always read the body, even when answering with an error
            entry["bytes_in"] = len(self._payload)
            user = self.hub.user_for(self.headers.get("Authorization"))
            entry["user"] = user
            self._route(user)
        except HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json(e.status, e.body if e.body is not None else {"error": e.message}, headers)
        except Exception as e:  # noqa: BLE001 - a server bug: answer 400 (not 5xx, which the client would retry)
            self._json(400, {"error": f"local hub bug: {type(e).__name__}: {e}"}, {"X-Error-Message": f"local hub bug: {e}"})
            entry["bug"] = repr(e)
        entry["status"] = self._status
        with self.hub._lock:
            self.hub.log.append(entry)
            if "bug" in entry:
                self.hub.bugs.append(entry)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _handle

    def _route(self, user: str | None) -> None:
        s, m = self._segments, self.command
        if s[:2] == ["api", "whoami-v2"]:
            if user is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            return self._json(200, {"type": "user", "name": user, "orgs": [{"name": o} for o, mem in self.hub.orgs.items() if user in mem]})
        if s[:3] == ["api", "repos", "create"] and m == "POST":
            return self._create_repo(user)
        if s[:2] == ["api", "validate-yaml"] and m == "POST":
            return self._validate_yaml()
        if s[:1] == ["lfs-upload"] and m == "PUT":
            return self._lfs_upload(s[1])
        if s[:1] == ["lfs-verify"] and m == "POST":
            return self._lfs_verify(s[1])
        if len(s) >= 4 and s[0] == "api" and s[1] in REPO_TYPES:
            repo_id = f"{s[2]}/{s[3]}"
            rest = s[4:]
            if not rest and m == "GET":
                return self._repo_info(s[1], repo_id, user, "main")
            if rest[:1] == ["revision"] and m == "GET":
                return self._repo_info(s[1], repo_id, user, "/".join(rest[1:]))
            if rest[:1] == ["preupload"] and m == "POST":
                return self._preupload(s[1], repo_id, user, "/".join(rest[1:]))
            if rest[:1] == ["commit"] and m == "POST":
                return self._commit(s[1], repo_id, user, "/".join(rest[1:]))
            if rest[:1] == ["branch"]:
                return self._branch(s[1], repo_id, user, "/".join(rest[1:]))
            if rest[:1] == ["tag"] and m == "POST":
                return self._tag(s[1], repo_id, user, "/".join(rest[1:]))
            if rest[:1] == ["refs"] and m == "GET":
                return self._refs(s[1], repo_id, user)
            if rest[:1] == ["tree"] and m == "GET":
                return self._tree(s[1], repo_id, user, rest[1], "/".join(rest[2:]))
            if rest[:1] == ["paths-info"] and m == "POST":
                return self._paths_info(s[1], repo_id, user, "/".join(rest[1:]))
        # git LFS batch: /[datasets/]ns/name.git/info/lfs/objects/batch
        rtype, segs = ("models", s)
        if s and s[0] in ("datasets", "spaces"):
            rtype, segs = s[0], s[1:]
        if len(segs) >= 6 and segs[1].endswith(".git") and segs[2:] == ["info", "lfs", "objects", "batch"] and m == "POST":
            return self._lfs_batch(rtype, f"{segs[0]}/{segs[1][:-4]}", user)
        if len(segs) >= 5 and segs[2] == "resolve" and m in ("GET", "HEAD"):
            return self._resolve(rtype, f"{segs[0]}/{segs[1]}", user, segs[3], "/".join(segs[4:]))
        raise HubError(404, f"no route for {m} {self._raw}")

    # -- endpoints ------------------------------------------------------------------------
    def _create_repo(self, user: str | None) -> None:
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        data = json.loads(self._payload or b"{}")
        ns = data.get("organization") or user
        name = data.get("name") or ""
        rtype = {"model": "models", "dataset": "datasets", "space": "spaces"}[data.get("type") or "model"]
        repo_id = f"{ns}/{name}"
        if not re.fullmatch(r"[\w.-]{1,96}", name):
            raise HubError(400, f"Invalid repo name {name!r}", body={"error": f"Invalid repo name {name!r}"})
        if not self.hub.can_write_ns(user, ns):
            raise HubError(403, f"You don't have the rights to create a repository under the namespace {ns!r}")
        prefix = "" if rtype == "models" else f"{rtype}/"
        url = f"{self.hub.endpoint}/{prefix}{repo_id}"
        with self.hub._lock:
            if (rtype, repo_id) in self.hub.repos:
                raise HubError(409, "You already created this model repo", body={"error": "You already created this model repo", "url": url})
            self.hub.create_repo(rtype, repo_id, data.get("visibility") == "private" or bool(data.get("private")))
        self._json(200, {"url": url, "name": repo_id})

    def _resolve_rev(self, repo: Repo, rev: str) -> str:
        oid = repo.resolve(rev)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return oid

    def _repo_info(self, rtype: str, repo_id: str, user: str | None, rev: str) -> None:
        repo = self.hub.get_repo(rtype, repo_id, user)
        oid = self._resolve_rev(repo, rev)
        tree = repo.commits[oid].tree
        self._json(200, {"id": repo_id, "modelId": repo_id, "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "sha": oid,
                         "private": repo.private, "disabled": False, "gated": "manual" if repo.gated else False, "tags": [],
                         "siblings": [{"rfilename": p} for p in sorted(tree)]})

    def _write_target(self, rtype: str, repo_id: str, user: str | None, rev: str) -> tuple[Repo, str]:
        repo = self.hub.get_repo(rtype, repo_id, user, write=True)
        if rev not in repo.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo, rev

    def _preupload(self, rtype: str, repo_id: str, user: str | None, rev: str) -> None:
        repo, branch = self._write_target(rtype, repo_id, user, rev)
        tree = repo.commits[repo.branches[branch]].tree
        patterns = self.hub.lfs_patterns(repo, tree)
        out = []
        for f in json.loads(self._payload)["files"]:
            path, size = f["path"], int(f["size"])
            sample = base64.b64decode(f.get("sample") or "")
            name = path.rsplit("/", 1)[-1]
            lfs = size >= LFS_THRESHOLD or b"\0" in sample or any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns)
            item: dict[str, Any] = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            existing = tree.get(path)
            if existing is not None:
                item["oid"] = existing.sha256 if existing.lfs else existing.tree_oid(repo.read_blob(existing.sha256))
            out.append(item)
        self._json(200, {"files": out, "commitOid": repo.branches[branch]})

    def _lfs_batch(self, rtype: str, repo_id: str, user: str | None) -> None:
        repo = self.hub.get_repo(rtype, repo_id, user, write=True)
        data = json.loads(self._payload)
        if data.get("operation") != "upload":
            raise HubError(400, "only the upload operation is supported")
        objects = []
        for obj in data["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            item: dict[str, Any] = {"oid": oid, "size": size}
            if not repo.has_blob(oid):
                secret = secrets.token_urlsafe(16)
                with self.hub._lock:
                    self.hub._uploads[secret] = (repo, oid, size)
                item["authenticated"] = True
                item["actions"] = {
                    "upload": {"href": f"{self.hub.endpoint}/lfs-upload/{secret}", "header": {}},
                    "verify": {"href": f"{self.hub.endpoint}/lfs-verify/{secret}", "header": {}},
                }
            objects.append(item)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, secret: str) -> None:
        target = self.hub._uploads.get(secret)
        if target is None:
            raise HubError(403, "upload URL is not valid")
        repo, oid, size = target
        if len(self._payload) != size or hashlib.sha256(self._payload).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not match oid {oid} / size {size}")
        repo.put_blob(self._payload)
        self._send(200, b"", {"ETag": f'"{hashlib.md5(self._payload).hexdigest()}"'})

    def _lfs_verify(self, secret: str) -> None:
        target = self.hub._uploads.get(secret)
        if target is None:
            raise HubError(403, "verify URL is not valid")
        repo, oid, size = target
        data = json.loads(self._payload)
        if data.get("oid") != oid or int(data.get("size", -1)) != size or not repo.has_blob(oid):
            raise HubError(404, f"object {oid} was not uploaded")
        self._json(200, {"success": True})

    def _commit(self, rtype: str, repo_id: str, user: str | None, rev: str) -> None:
        repo, branch = self._write_target(rtype, repo_id, user, rev)
        lines = [json.loads(x) for x in self._payload.decode().splitlines() if x.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first NDJSON line must be the header")
        header = lines[0]["value"]
        with self.hub._lock:
            head = repo.branches[branch]
            if header.get("parentCommit") and header["parentCommit"] != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[head].tree)
            for line in lines[1:]:
                key, val = line["key"], line["value"]
                path = val["path"]
                if key == "file":
                    if val.get("encoding", "base64") != "base64":
                        raise HubError(400, "only base64 encoding is supported")
                    data = base64.b64decode(val["content"])
                    tree[path] = Entry(repo.put_blob(data), len(data), False)
                elif key == "lfsFile":
                    if not repo.has_blob(val["oid"]):
                        raise HubError(400, f"LFS object {val['oid']} for {path} was never uploaded")
                    tree[path] = Entry(val["oid"], int(val["size"]), True)
                elif key == "deletedFile":
                    if path not in tree:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del tree[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for p in [p for p in tree if p.startswith(prefix)]:
                        del tree[p]
                else:
                    raise HubError(400, f"unsupported commit operation {key!r}")
            oid = self.hub.new_commit(repo, head, tree, header.get("summary", ""))
            repo.branches[branch] = oid
            repo.save_meta()
        prefix = "" if rtype == "models" else f"{rtype}/"
        self._json(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.hub.endpoint}/{prefix}{repo_id}/commit/{oid}",
                         "commitMessage": header.get("summary", "")})

    def _validate_yaml(self) -> None:
        import yaml

        data = json.loads(self._payload)
        content = data.get("content", "")
        errors: list[dict[str, str]] = []
        warnings: list[dict[str, str]] = []
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        if match is None:
            warnings.append({"message": "Empty or missing yaml metadata in repo card"})
        else:
            try:
                meta = yaml.safe_load(match.group(1))
            except yaml.YAMLError as e:
                meta = None
                errors.append({"message": f"YAML is not valid: {e}"})
            if meta is not None and not isinstance(meta, dict):
                errors.append({"message": '"metadata" must be an object'})
            elif isinstance(meta, dict):
                for key in ("base_model", "tags", "license", "library_name", "pipeline_tag", "base_model_relation", "datasets"):
                    if key not in meta:
                        continue
                    val = meta[key]
                    if key in ("base_model", "tags", "datasets"):
                        ok = isinstance(val, str) or (isinstance(val, list) and all(isinstance(x, str) for x in val))
                    else:
                        ok = isinstance(val, str)
                    if not ok:
                        errors.append({"message": f'"{key}" must be a string' + (" or an array of strings" if key in ("base_model", "tags", "datasets") else "")})
                if "base_model_relation" in meta and meta["base_model_relation"] not in VALID_RELATIONS:
                    errors.append({"message": f'"base_model_relation" must be one of {", ".join(VALID_RELATIONS)}'})
                if "base_model_relation" in meta and "base_model" not in meta:
                    errors.append({"message": '"base_model_relation" requires "base_model"'})
        if errors:
            return self._json(400, {"errors": errors, "warnings": warnings}, {"X-Error-Message": errors[0]["message"]})
        self._json(200, {"errors": [], "warnings": warnings})

    def _branch(self, rtype: str, repo_id: str, user: str | None, branch: str) -> None:
        repo = self.hub.get_repo(rtype, repo_id, user, write=True)
        with self.hub._lock:
            if self.command == "DELETE":
                if branch not in repo.branches or branch == "main":
                    raise HubError(404 if branch not in repo.branches else 403, f"cannot delete branch {branch}", "RevisionNotFound" if branch not in repo.branches else None)
                del repo.branches[branch]
                repo.save_meta()
                return self._json(200, {})
            if self.command != "POST":
                raise HubError(405, "method not allowed")
            data = json.loads(self._payload or b"{}")
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = self._resolve_rev(repo, data.get("startingPoint") or "main")
            repo.branches[branch] = start
            repo.save_meta()
        self._json(200, {})

    def _tag(self, rtype: str, repo_id: str, user: str | None, rev: str) -> None:
        repo = self.hub.get_repo(rtype, repo_id, user, write=True)
        data = json.loads(self._payload or b"{}")
        with self.hub._lock:
            if data["tag"] in repo.tags:
                raise HubError(409, f"Tag already exists: {data['tag']}")
            repo.tags[data["tag"]] = self._resolve_rev(repo, rev)
            repo.save_meta()
        self._json(200, {})

    def _refs(self, rtype: str, repo_id: str, user: str | None) -> None:
        repo = self.hub.get_repo(rtype, repo_id, user)
        self._json(200, {
            "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in sorted(repo.branches.items())],
            "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c} for t, c in sorted(repo.tags.items())],
            "converts": [],
            "pullRequests": [],
        })

    def _tree(self, rtype: str, repo_id: str, user: str | None, rev: str, path: str) -> None:
        repo = self.hub.get_repo(rtype, repo_id, user)
        tree = repo.commits[self._resolve_rev(repo, rev)].tree
        recursive = self._query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in tree):
            raise HubError(404, f"{path} does not exist on this revision", "EntryNotFound")
        files, dirs = [], set()
        for p in sorted(tree):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix):]
            parts = rel.split("/")
            for i in range(1, len(parts)):
                if recursive or i == 1:
                    dirs.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                files.append(p)
        out: list[dict[str, Any]] = [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d} for d in sorted(dirs)
        ]
        out.extend(self._file_item(repo, p, tree[p]) for p in files)
        self._json(200, out)

    def _file_item(self, repo: Repo, path: str, e: Entry) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "file", "oid": e.tree_oid(None if e.lfs else repo.read_blob(e.sha256)), "size": e.size, "path": path}
        if e.lfs:
            item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
        return item

    def _paths_info(self, rtype: str, repo_id: str, user: str | None, rev: str) -> None:
        """``POST …/paths-info/{rev}`` with form fields ``paths`` (repeated) and ``expand``: the
        entries that exist (files and folders), the others left out."""
        repo = self.hub.get_repo(rtype, repo_id, user)
        tree = repo.commits[self._resolve_rev(repo, rev)].tree
        form = parse_qs(self._payload.decode())
        out: list[dict[str, Any]] = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in tree:
                out.append(self._file_item(repo, path, tree[path]))
            elif any(p.startswith(path + "/") for p in tree):
                out.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path})
        self._json(200, out)

    def _resolve(self, rtype: str, repo_id: str, user: str | None, rev: str, path: str) -> None:
        repo = self.hub.get_repo(rtype, repo_id, user)
        self.hub.check_gate(repo, user)
        oid = self._resolve_rev(repo, rev)
        entry = repo.commits[oid].tree.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", body={"error": "Entry not found"})
        data = repo.read_blob(entry.sha256)
        etag = entry.sha256 if entry.lfs else git_blob_sha1(data)
        headers = {"X-Repo-Commit": oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m and self.command == "GET":
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start : end + 1], headers, "application/octet-stream")
        self._send(200, data, headers, "application/octet-stream")


__all__ = ["HubServer", "git_blob_sha1", "lfs_pointer"]
