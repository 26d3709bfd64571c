"""Preset weights: the local cache and the one-time download from the Hugging Face Hub.

A preset ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl") lives in the cache ($MINIGPT_HOME,
default ~/.cache/minigpt) as <name>/config.json + <name>/model.safetensors. `download_preset`
fetches the missing files once from $MINIGPT_HUB_URL / $HF_ENDPOINT (default huggingface.co),
urllib only, each written atomically; MINIGPT_OFFLINE / HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE=1
turn downloads off.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import CheckpointError
from ..fileio import atomic_write
from ..model.config import PRESETS

PathLike = str | os.PathLike

__all__ = ["HUB_URL", "PRESET_FILES", "cache_dir", "download_preset", "is_preset_cached", "preset_dir"]


HUB_URL = "https://huggingface.co"
PRESET_FILES = ("config.json", "model.safetensors")


def cache_dir() -> Path:
    """$MINIGPT_HOME, default ~/.cache/minigpt."""
    return Path(os.environ.get("MINIGPT_HOME") or Path.home() / ".cache" / "minigpt").expanduser()


def preset_dir(name: str, cache: PathLike | None = None) -> Path:
    """The folder of preset `name` in `cache` (default cache_dir())."""
    return (Path(cache).expanduser() if cache is not None else cache_dir()) / name


def is_preset_cached(name: str, cache: PathLike | None = None) -> bool:
    """True when every file of PRESET_FILES is in the preset's folder."""
    d = preset_dir(name, cache)
    return all((d / f).is_file() for f in PRESET_FILES)


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("MINIGPT_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_url() -> str:
    return (os.environ.get("MINIGPT_HUB_URL") or os.environ.get("HF_ENDPOINT") or HUB_URL).rstrip("/")


def _urlopen(url: str, timeout: float = 30.0):
    """Module-level so tests can replace it; urllib only."""
    req = urllib.request.Request(url, headers={"User-Agent": "minigpt"})
    return urllib.request.urlopen(req, timeout=timeout)


def _download(url: str, dest: Path, desc: str) -> None:
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)

    def fetch(tmp: str) -> None:
        with _urlopen(url) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            n = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                      disable=os.environ.get("MINIGPT_NO_PROGRESS") == "1") as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    n += len(chunk)
                    bar.update(len(chunk))
            if total is not None and n != total:
                raise CheckpointError(f"download of {url} stopped after {n} of {total} bytes")
    atomic_write(dest, fetch)


def download_preset(name: str, cache: PathLike | None = None, *, allowed: bool = True) -> Path:
    """Download <hub>/<name>/resolve/main/{config.json,model.safetensors} into the cache once."""
    if name not in PRESETS:
        raise CheckpointError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    d = preset_dir(name, cache)
    if is_preset_cached(name, cache):
        return d
    hint = (f"download it once while online, set MINIGPT_HOME to a directory holding {name}/config.json "
            f"and {name}/model.safetensors, or pass a local checkpoint directory")
    if not allowed or _offline():
        raise CheckpointError(f"preset {name!r} is not cached in {d} and downloads are disabled "
                              f"(offline mode); {hint}")
    base = _hub_url()
    for fname in PRESET_FILES:
        if (d / fname).is_file():
            continue
        url = f"{base}/{name}/resolve/main/{fname}"
        try:
            _download(url, d / fname, f"{name}/{fname}")
        except CheckpointError as e:
            raise CheckpointError(f"preset {name!r}: {e}; {hint}") from e
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise CheckpointError(f"preset {name!r} is not cached in {d} and downloading {url} failed "
                                  f"({reason}); {hint}") from e
    return d
