"""A fake Hugging Face Hub on 127.0.0.1 for the tests: the /resolve/ endpoint as huggingface_hub reads it.

    hub = FakeHub().start()                      # two servers: the Hub and a "CDN" on another port
    commit = hub.add("org/tiny", {"config.json": b"...", "model.safetensors": b"..."}, tags=["v1"])
    hub.url                                      # what HF_ENDPOINT is set to
    hub.stop()

GET/HEAD {url}/{repo}/resolve/{revision}/{file} (revision: a branch, a tag or a commit sha, quoted):
* small files: 200 with X-Repo-Commit, ETag "<git blob sha1>", Content-Length;
* LFS files (.safetensors, .bin): 302 to the CDN server (another origin, like the Hub's CDN) with
  X-Repo-Commit, X-Linked-Etag "<sha256>", X-Linked-Size; the CDN answers GET/HEAD /blobs/<sha256>
  with Range support, and refuses requests that carry an Authorization header (as signed URLs do);
* errors as the Hub sends them: 401 RepoNotFound (unknown or private repo without a valid token),
  403 GatedRepo, 404 RevisionNotFound, 404 EntryNotFound (with X-Repo-Commit);
* faults for the tests: `truncate[sha256] = n` (the body stops at byte n, the connection closes),
  `corrupt` (sha256s served with a flipped byte), `ignore_range` (200 with the whole file), `no_length`
  (LFS files sent with no size: the body ends when the connection closes),
  `hold[sha256] = k` (the first GET of that blob waits until k HEADs asked for it: two processes overlap);
  `renames[old] = new` (a renamed repo: 307 to the same path under the new name).
Every request is logged in `hub.log` as (server, method, path, headers dict).
"""
from __future__ import annotations

import hashlib
import http.server
import threading
import time
import urllib.parse

LFS_SUFFIXES = (".safetensors", ".bin")


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, private: bool = False, gated: bool = False):
        self.private, self.gated = private, gated
        self.refs: dict[str, str] = {}                 # branch/tag -> commit
        self.commits: dict[str, dict[str, bytes]] = {}


class FakeHub:
    def __init__(self, token: str = "hf_secret"):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}              # sha256 -> bytes (what the CDN serves)
        self.log: list[tuple[str, str, str, dict]] = []
        self.truncate: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.ignore_range = False
        self.no_length = False                          # LFS files without X-Linked-Size / Content-Length
        self.hold: dict[str, int] = {}
        self.renames: dict[str, str] = {}               # old repo id -> new: a 307 to the new path (as the Hub)
        self._cond = threading.Condition()
        self._lfs_names: dict[str, set[str]] = {}
        self._servers = []

    # --- content -------------------------------------------------------------------------------
    def add(self, repo_id: str, files: dict[str, bytes], *, revision: str = "main", tags=(), private=False,
            gated=False) -> str:
        """A new commit of `repo_id` holding `files` (bytes or str), at branch `revision` and `tags`."""
        repo = self.repos.setdefault(repo_id, Repo(private, gated))
        files = {k: v.encode() if isinstance(v, str) else bytes(v) for k, v in files.items()}
        commit = hashlib.sha1(f"{repo_id}:{len(repo.commits)}:{sorted(files)}".encode()).hexdigest()
        repo.commits[commit] = files
        for name in (revision, *tags):
            repo.refs[name] = commit
        for name, data in files.items():
            if name.endswith(LFS_SUFFIXES):
                sha = hashlib.sha256(data).hexdigest()
                self.blobs[sha] = data
                self._lfs_names.setdefault(sha, set()).add(name)
        return commit

    def requests(self, method: str | None = None, server: str | None = None) -> list[str]:
        return [p for s, m, p, _ in self.log if (method is None or m == method) and (server is None or s == server)]

    # --- servers -------------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10                                # a stuck client never hangs the server thread
            server_name = ""

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        for name in ("hub", "cdn"):
            cls = type(f"{name.title()}Handler", (Handler,), {"server_name": name})
            srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), cls)
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self._servers.append(srv)
        return self

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    # --- request handling ----------------------------------------------------------------------
    def _handle(self, h, head: bool) -> None:
        with self._cond:
            self.log.append((h.server_name, "HEAD" if head else "GET", h.path, dict(h.headers.items())))
            self._cond.notify_all()
        try:
            if h.server_name == "cdn":
                self._cdn(h, head)
            else:
                self._resolve(h, head)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _reply(self, h, status: int, headers: dict, body: bytes = b"", head: bool = False, length=True) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, str(v))
        if length and "Content-Length" not in headers:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _error(self, h, status: int, code: str, head: bool, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "Content-Type": "application/json"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._reply(h, status, headers, f'{{"error": "{code}"}}'.encode(), head)

    def _resolve(self, h, head: bool) -> None:
        path = urllib.parse.urlsplit(h.path).path
        parts = path.lstrip("/").split("/")
        if "resolve" not in parts:
            return self._error(h, 404, "RepoNotFound", head)
        i = parts.index("resolve")
        repo_id = "/".join(parts[:i])
        revision = urllib.parse.unquote(parts[i + 1]) if len(parts) > i + 1 else ""
        filename = urllib.parse.unquote("/".join(parts[i + 2:]))
        if repo_id in self.renames:
            rest = h.path[len("/" + repo_id):]
            return self._reply(h, 307, {"Location": f"/{self.renames[repo_id]}{rest}"}, b"", head)
        repo = self.repos.get(repo_id)
        auth = h.headers.get("Authorization")
        ok_token = auth == f"Bearer {self.token}"
        if repo is None or (repo.private and not ok_token):
            return self._error(h, 404 if auth else 401, "RepoNotFound", head)
        if repo.gated and not ok_token:
            return self._error(h, 403, "GatedRepo", head)
        commit = revision if revision in repo.commits else repo.refs.get(revision)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound", head)
        data = repo.commits[commit].get(filename)
        if data is None:
            return self._error(h, 404, "EntryNotFound", head, commit)
        if filename.endswith(LFS_SUFFIXES):
            sha = hashlib.sha256(data).hexdigest()
            headers = {"Location": f"{self.cdn_url}/blobs/{sha}?signed=1", "X-Repo-Commit": commit,
                       "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": len(data), "ETag": f'"{git_blob_sha(data)}"'}
            if self.no_length:
                del headers["X-Linked-Size"]
            return self._reply(h, 302, headers, b"", head)
        self._send_data(h, data, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha(data)}"'}, head)

    def _cdn(self, h, head: bool) -> None:
        if h.headers.get("Authorization"):
            return self._reply(h, 400, {}, b"signed URLs take no Authorization header", head)
        sha = urllib.parse.urlsplit(h.path).path.rsplit("/", 1)[-1]
        data = self.blobs.get(sha)
        if data is None:
            return self._reply(h, 404, {}, b"no such blob", head)
        if not head and sha in self.hold:
            with self._cond:                           # wait (bounded) until enough clients asked for it
                self._cond.wait_for(lambda: self._heads_for(sha) >= self.hold[sha], timeout=20)
                self.hold.pop(sha, None)
        if sha in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        self._send_data(h, data, {"ETag": f'"{sha}"'}, head, cut=self.truncate.get(sha))

    def _heads_for(self, sha: str) -> int:
        names = self._lfs_names.get(sha, set())
        return sum(1 for srv, m, p, _ in self.log
                   if srv == "hub" and m == "HEAD" and any(p.endswith("/" + n) for n in names))

    def _send_data(self, h, data: bytes, headers: dict, head: bool, cut: int | None = None) -> None:
        start = 0
        rng = h.headers.get("Range")
        if rng and not self.ignore_range and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[6:-1])
            if start >= len(data):
                return self._reply(h, 416, {"Content-Range": f"bytes */{len(data)}"}, b"", head)
            headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            status = 206
        else:
            status = 200
        body = data[start:]
        headers = {**headers, "Accept-Ranges": "bytes", **({} if self.no_length else {"Content-Length": len(body)})}
        if head:
            return self._reply(h, status, headers, b"", True, length=False)
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, str(v))
        h.end_headers()
        if cut is not None:
            body = data[start:max(cut, start)]         # the connection drops at byte `cut` of the file
            h.close_connection = True
        for i in range(0, len(body), 1 << 16):
            h.wfile.write(body[i:i + (1 << 16)])
        h.wfile.flush()
        if cut is not None:
            time.sleep(0.01)
