"""The Hugging Face Hub cache on disk, in huggingface_hub's layout, shared with transformers both ways.

    $HF_HUB_CACHE (else $HF_HOME/hub, else ~/.cache/huggingface/hub)/
      models--ORG--NAME/
        refs/REVISION              the commit sha a branch or tag (REVISION) pointed to when fetched
        snapshots/COMMIT/FILE      relative symlinks to ../../blobs/ETAG (a copy where symlinks fail)
        blobs/ETAG                 the file: ETAG is the sha256 of an LFS file, the git blob sha of others
        blobs/ETAG.incomplete      a download in progress or interrupted (resumed from its size)
        .no_exist/COMMIT/FILE      empty markers: FILE is not in that commit
      .locks/models--ORG--NAME/ETAG.lock   one lock per blob (huggingface_hub locks the same file)

No network here (minigpt.weights.hub downloads); only what reads and writes that layout.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = ["COMMIT_RE", "SHA256_RE", "blob_lock", "find_snapshot", "hf_cache_dir", "hf_home", "link_blob",
           "mark_no_exist", "read_ref", "repo_folder", "safe_relpath", "snapshot_weight_files", "write_ref"]

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def hf_cache_dir() -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub
    (where huggingface_hub and transformers keep their downloads)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    return hf_home() / "hub"


def hf_home() -> Path:
    """$HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface (also holds the token file)."""
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface"


def repo_folder(repo_id: str, cache: str | os.PathLike | None = None) -> Path:
    """cache / models--ORG--NAME (cache: default hf_cache_dir())."""
    root = Path(cache).expanduser() if cache is not None else hf_cache_dir()
    return root / ("models--" + repo_id.replace("/", "--"))


def safe_relpath(name: str) -> str:
    """`name` if it is a plain relative file path inside a repo (no '..', not absolute), else ValueError."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"unsafe file name {name!r} in a Hub repo")
    return "/".join(parts)


def read_ref(folder: Path, revision: str) -> str | None:
    """The commit a branch/tag was cached at; a commit sha is its own answer; None when unknown."""
    if COMMIT_RE.match(revision):
        return revision
    try:
        commit = (folder / "refs" / safe_relpath(revision)).read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        return None
    return commit if COMMIT_RE.match(commit) else None


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_ref(folder: Path, revision: str, commit: str) -> None:
    """refs/REVISION := commit (no file for a revision that is itself the commit)."""
    if revision != commit:
        _atomic_text(folder / "refs" / safe_relpath(revision), commit)


def mark_no_exist(folder: Path, commit: str, filename: str) -> None:
    """Record that `filename` is not in `commit` (huggingface_hub's .no_exist marker); best effort."""
    with contextlib.suppress(OSError, ValueError):
        p = folder / ".no_exist" / commit / safe_relpath(filename)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()


def link_blob(folder: Path, commit: str, filename: str, etag: str) -> Path:
    """snapshots/COMMIT/FILE -> ../../blobs/ETAG (relative symlink; a copy where symlinks are not
    allowed). Atomic: a reader never sees a half-made link. Returns the snapshot path."""
    dst = folder / "snapshots" / commit / safe_relpath(filename)
    blob = folder / "blobs" / etag
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_file():
        return dst
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.symlink(os.path.relpath(blob, dst.parent), tmp)
    except OSError:                                   # e.g. Windows without developer mode
        shutil.copyfile(blob, tmp)
    os.replace(tmp, dst)
    return dst


@contextlib.contextmanager
def blob_lock(folder: Path, etag: str):
    """An exclusive lock on .locks/models--ORG--NAME/ETAG.lock for as long as the block runs: one process
    downloads a blob while the others wait (fcntl.flock; the lock file huggingface_hub uses too)."""
    path = folder.parent / ".locks" / folder.name / f"{etag}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl
        except ImportError:                           # Windows: no lock (each download is still atomic)
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _index_shards(index: Path) -> list[str] | None:
    try:
        wm = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        shards = sorted({safe_relpath(v) for v in wm.values()})
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return shards or None


def snapshot_weight_files(d: Path) -> list[str] | None:
    """The weight files a snapshot folder holds in full (safetensors preferred, then pytorch_model.bin),
    as relative names; None when it holds no complete set."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (d / single).is_file():
            return [single]
        if (d / index).is_file():
            shards = _index_shards(d / index)
            if shards and all((d / s).is_file() for s in shards):
                return [index, *shards]
    return None


def find_snapshot(repo_ids: list[str], revision: str, cache: Path | None = None) -> Path | None:
    """The first cached snapshot of `revision` among `repo_ids` (a repo and its older names) that holds
    config.json and a complete set of weights; None when there is none. Reads only."""
    for repo_id in repo_ids:
        folder = repo_folder(repo_id, cache)
        commit = read_ref(folder, revision)
        if commit is None:
            continue
        d = folder / "snapshots" / commit
        if (d / "config.json").is_file() and snapshot_weight_files(d):
            return d
    return None
