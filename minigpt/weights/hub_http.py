"""The Hub's HTTP side (urllib only): settings, HEAD metadata of /resolve/ and blob downloads into the cache.

{endpoint}/{repo}/resolve/{revision}/{file} is asked with HEAD for the X-Repo-Commit, ETag / X-Linked-Etag and
X-Linked-Size headers; a redirect to another path of the Hub is followed, one to another host (the CDN of an LFS
file) is where the GET goes. The token ($HF_TOKEN, else the file $HF_HOME/token) is sent to the endpoint only.
Each blob downloads under its lock (minigpt.weights.hf_cache.blob_lock) into blobs/ETAG.incomplete, resumes
from that file's size with a Range request, is checked (size; sha256 for LFS files), fsynced and renamed.
minigpt.weights.hub decides which files; this module fetches one.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

from ..errors import CheckpointError
from . import hf_cache
from .hf_cache import SHA256_RE, blob_lock, link_blob

__all__ = ["HUB_URL", "FileMeta", "NetError", "endpoint", "fetch", "file_meta", "hf_token", "offline"]

HUB_URL = "https://huggingface.co"
_CHUNK = 1 << 20


# ================================================================================================
# Settings
# ================================================================================================
def offline() -> str | None:
    """The variable that turns downloads off (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, MINIGPT_OFFLINE), or None."""
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MINIGPT_OFFLINE"):
        if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{v}={os.environ[v]}"
    return None


def endpoint() -> str:
    """$HF_ENDPOINT (or $MINIGPT_HUB_URL), default https://huggingface.co."""
    return (os.environ.get("MINIGPT_HUB_URL") or os.environ.get("HF_ENDPOINT") or HUB_URL).rstrip("/")


def hf_token() -> str | None:
    """$HF_TOKEN (or HUGGING_FACE_HUB_TOKEN), else the file $HF_TOKEN_PATH / $HF_HOME/token (`hf auth login`)."""
    tok = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if tok and tok.strip():
        return tok.strip()
    path = Path(os.environ.get("HF_TOKEN_PATH") or hf_cache.hf_home() / "token").expanduser()
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _timeout(var: str, default: float) -> float:
    try:
        return float(os.environ.get(var) or default)
    except ValueError:
        return default


# ================================================================================================
# HTTP (urllib; redirects followed by hand so the token never leaves the endpoint)
# ================================================================================================
class NetError(Exception):
    """The Hub could not be reached (connection, timeout, protocol)."""

    def __init__(self, url: str, reason: str):
        super().__init__(reason)
        self.url, self.reason = url, reason


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None                                   # a 3xx comes back as the response; we follow it


_OPENER = urllib.request.build_opener(_NoRedirect)


def _origin(url: str) -> tuple:
    u = urlsplit(url)
    return u.scheme, (u.hostname or "").lower(), u.port or {"http": 80, "https": 443}.get(u.scheme)


def _headers(url: str, extra: dict | None = None) -> dict:
    h = {"User-Agent": "minigpt", "Accept-Encoding": "identity", **(extra or {})}
    tok = hf_token()
    if tok and _origin(url) == _origin(endpoint()):
        h["Authorization"] = f"Bearer {tok}"
    return h


def _request(method: str, url: str, extra: dict | None = None, timeout: float = 10.0):
    """(status, headers, response) for one request, redirects not followed, HTTP errors returned."""
    req = urllib.request.Request(url, method=method, headers=_headers(url, extra))
    try:
        r = _OPENER.open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        raise NetError(url, str(getattr(e, "reason", None) or e) or type(e).__name__) from None
    return r.status, r.headers, r


def _http_error(status: int, headers, url: str, repo_id: str, revision: str) -> CheckpointError:
    code = headers.get("X-Error-Code") or ""
    page = f"{endpoint()}/{repo_id}"
    if status in (401, 403):
        if code == "GatedRepo":
            return CheckpointError(f"{repo_id} is a gated repo (HTTP {status}): accept its terms on {page} while "
                                   "logged in, then set HF_TOKEN to a token of that account")
        who = ("the token sent (HF_TOKEN, else $HF_HOME/token) cannot read it" if hf_token() else
               "set HF_TOKEN to a token that can read it")
        return CheckpointError(f"{repo_id}: not a local folder, and the Hub denied access (HTTP {status}): the repo "
                               f"does not exist, or it is private or gated: {who} (for a gated repo, accept its "
                               f"terms on {page} first)")
    if status == 404 and code == "RevisionNotFound":
        return CheckpointError(f"{repo_id} has no revision {revision!r} (HTTP 404): check the branch, tag or "
                               "commit sha")
    if status == 404 and code == "RepoNotFound":
        private = ", or, for a private repo, that the token in HF_TOKEN can read it" if hf_token() else ""
        return CheckpointError(f"{repo_id}: not a local folder, and no Hub repo {repo_id!r} at {endpoint()} "
                               f"(HTTP 404): check the name (ORG/NAME){private}")
    if status == 404:
        return CheckpointError(f"not found (HTTP 404): {url}")
    return CheckpointError(f"{url}: HTTP {status} from the Hub; try again later")


@dataclass
class FileMeta:
    """What a HEAD of /resolve/ says about one file."""

    repo_id: str
    filename: str
    commit: str
    etag: str
    size: int | None
    location: str               # where to GET it (the CDN after a redirect to another host)


def _meta_from(repo_id: str, filename: str, headers, url: str, location: str, redirected: bool) -> FileMeta:
    commit = headers.get("X-Repo-Commit")
    etag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").strip()
    etag = etag[2:] if etag.startswith("W/") else etag
    etag = etag.strip('"')
    if not commit or not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise CheckpointError(f"{url}: the reply has no X-Repo-Commit header: not a Hugging Face Hub endpoint? "
                              f"(check HF_ENDPOINT, now {endpoint()})")
    if not re.fullmatch(r"[\w.-]{1,128}", etag):
        raise CheckpointError(f"{url}: the reply has no usable ETag header; cannot cache the file")
    size = headers.get("X-Linked-Size") or (None if redirected else headers.get("Content-Length"))
    return FileMeta(repo_id, filename, commit, etag, int(size) if size and size.isdigit() else None, location)


def file_meta(repo_id: str, filename: str, revision: str) -> FileMeta | None:
    """HEAD {endpoint}/{repo}/resolve/{revision}/{filename}: None when the file is not in that revision;
    CheckpointError for a missing repo or revision, no access, or a server fault."""
    url = f"{endpoint()}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"
    first = url
    for _ in range(8):
        status, h, r = _request("HEAD", url, timeout=_timeout("HF_HUB_ETAG_TIMEOUT", 10.0))
        r.close()
        if 300 <= status < 400 and h.get("Location"):
            target = urljoin(url, h["Location"])
            if _origin(target) == _origin(url):       # another path of the Hub (a renamed repo): follow
                url = target
                continue
            return _meta_from(repo_id, filename, h, url, target, redirected=True)   # an LFS file on a CDN
        if status == 404 and (h.get("X-Error-Code") in (None, "EntryNotFound")):
            return None
        if status >= 300:
            raise _http_error(status, h, first, repo_id, revision)
        meta = _meta_from(repo_id, filename, h, url, url, redirected=False)
        pinned = f"/resolve/{quote(revision, safe='')}/"       # GET the commit HEAD saw, not a moving branch
        if pinned in url:
            meta.location = url.replace(pinned, f"/resolve/{meta.commit}/", 1)
        return meta
    raise CheckpointError(f"{first}: too many redirects")


# ================================================================================================
# Downloading one blob: lock, resume, verify, rename
# ================================================================================================
class _Part:
    """blobs/ETAG.incomplete as it fills: open file, bytes so far, their sha256, the progress bar."""

    def __init__(self, f, bar):
        self.f, self.bar, self.have, self.sha = f, bar, 0, hashlib.sha256()

    def restart(self) -> None:
        self.f.seek(0)
        self.f.truncate()
        self.bar.update(-self.have)
        self.have, self.sha = 0, hashlib.sha256()

    def add(self, chunk: bytes) -> None:
        self.f.write(chunk)
        self.sha.update(chunk)
        self.have += len(chunk)
        self.bar.update(len(chunk))


def _open_get(meta: FileMeta, start: int):
    """GET meta.location from byte `start` (Range), following redirects: (status, headers, response, url)."""
    url, extra = meta.location, ({"Range": f"bytes={start}-"} if start else {})
    for _ in range(8):
        status, h, r = _request("GET", url, extra, timeout=_timeout("HF_HUB_DOWNLOAD_TIMEOUT", 30.0))
        if not (300 <= status < 400 and h.get("Location")):
            return status, h, r, url
        r.close()
        url = urljoin(url, h["Location"])
    raise CheckpointError(f"{meta.location}: too many redirects")


def _stream(meta: FileMeta, part: _Part) -> tuple[bool, bool]:
    """One GET into the part file, resumed from its size: (made progress, the body ended cleanly)."""
    status, h, r, url = _open_get(meta, part.have)
    with r:
        if status == 416:                             # a Range past the end: start over
            part.restart()
            return True, False
        if status >= 300:
            raise _http_error(status, h, url, meta.repo_id, meta.commit)
        if part.have and status == 200:               # the server ignored the Range: the whole file comes
            part.restart()
        before = part.have
        while True:
            try:
                chunk = r.read(_CHUNK)
            except (OSError, http.client.HTTPException):           # dropped connection, timeout mid-body
                return part.have > before, False
            if not chunk:
                return part.have > before, True
            part.add(chunk)


def _progress(meta: FileMeta):
    from tqdm.auto import tqdm

    off = any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes")
              for v in ("HF_HUB_DISABLE_PROGRESS_BARS", "MINIGPT_NO_PROGRESS"))
    return tqdm(total=meta.size, unit="B", unit_scale=True, unit_divisor=1024, disable=off,
                desc=f"{meta.repo_id}/{meta.filename}")


def _download_blob(folder: Path, meta: FileMeta) -> None:
    """blobs/ETAG from meta.location, once: under the blob's lock (other processes wait, then find it)."""
    blob = folder / "blobs" / meta.etag
    if blob.is_file():
        return
    blob.parent.mkdir(parents=True, exist_ok=True)
    with blob_lock(folder, meta.etag):
        if blob.is_file():                            # another process finished it while we waited
            return
        part_path = blob.with_name(f"{meta.etag}.incomplete")
        with open(part_path, "a+b") as f, _progress(meta) as bar:
            part = _Part(f, bar)
            f.seek(0)
            while chunk := f.read(_CHUNK):            # resume: hash what an earlier run left
                part.sha.update(chunk)
                part.have += len(chunk)
            bar.update(part.have)
            if meta.size is not None and part.have > meta.size:
                part.restart()
            done = meta.size is not None and part.have == meta.size
            for _ in range(4 * (not done)):           # a dropped connection resumes a few times
                progress, clean = _stream(meta, part)
                if (part.have == meta.size if meta.size is not None else clean) or not progress:
                    break
            f.flush()
            os.fsync(f.fileno())
        _finish(part, part_path, blob, meta)


def _finish(part: _Part, part_path: Path, blob: Path, meta: FileMeta) -> None:
    what = f"{meta.repo_id}/{meta.filename}"
    if meta.size is not None and part.have != meta.size:
        raise CheckpointError(f"download of {what} stopped after {part.have} of {meta.size} bytes (the connection "
                              f"dropped); run again to resume it from {part_path}")
    if SHA256_RE.match(meta.etag) and part.sha.hexdigest() != meta.etag:
        part_path.unlink(missing_ok=True)
        raise CheckpointError(f"download of {what} is corrupted (sha256 {part.sha.hexdigest()[:12]}... but the Hub "
                              f"says {meta.etag[:12]}...); it was deleted: run again to download it afresh")
    os.replace(part_path, blob)


def fetch(folder: Path, meta: FileMeta) -> Path:
    """The file in the snapshot of meta.commit (downloaded when its blob is missing)."""
    _download_blob(folder, meta)
    return link_blob(folder, meta.commit, meta.filename, meta.etag)
