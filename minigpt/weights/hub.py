"""Models on the Hugging Face Hub by name ("ORG/NAME", a preset), fetched into the cache transformers uses.

`resolve_source(src, revision)` turns a Hub name into a local snapshot folder that
minigpt.weights.checkpoint loads:

* a preset name ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl") is the Hub repo openai-community/<name>
  (the GPT-Neo presets EleutherAI/<name>, "distilgpt2" distilbert/distilgpt2); a GPT-2 preset already in
  the old minigpt cache ($MINIGPT_HOME, default ~/.cache/minigpt: <name>/config.json +
  <name>/model.safetensors) loads from there;
* any "ORG/NAME" whose config.json has model_type "gpt2" or "gpt_neo" (checked before any weights are
  fetched): config.json, then model.safetensors, else model.safetensors.index.json + its shards, else
  pytorch_model.bin (read later with weights_only=True);
* the files live in the Hugging Face cache (minigpt.weights.hf_cache: $HF_HUB_CACHE, else $HF_HOME/hub,
  else ~/.cache/huggingface/hub) in huggingface_hub's layout, so what transformers downloaded loads
  with no second copy and what minigpt downloads transformers loads offline;
* a revision (branch, tag or commit sha; default main) already cached with its weights is used as it
  is, with no network; otherwise it is fetched (minigpt.weights.hub_http: HF_ENDPOINT, HF_TOKEN,
  redirects, locks, resume, checks) and refs/REVISION records its commit;
* HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1 (or MINIGPT_OFFLINE=1): the cache only.

urllib only (huggingface_hub is not needed); every failure is one CheckpointError line.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError
from ..fileio import read_json_object
from ..model.config import PRESETS
from . import hf_cache
from .hf_cache import find_snapshot, hf_cache_dir, repo_folder
from .hub_http import HUB_URL, FileMeta, NetError, endpoint, fetch, file_meta, hf_token, offline

PathLike = str | os.PathLike

__all__ = ["HUB_URL", "PRESET_FILES", "PRESET_REPOS", "SUPPORTED_MODEL_TYPES", "cache_dir", "check_model_type",
           "endpoint", "hf_token", "hub_repo_id", "is_preset_cached", "offline", "preset_dir", "resolve_source",
           "snapshot_download"]

PRESET_FILES = ("config.json", "model.safetensors")
PRESET_REPOS = {**{name: ("EleutherAI/" if p.get("arch") == "gpt_neo" else "openai-community/") + name
                   for name, p in PRESETS.items()}, "distilgpt2": "distilbert/distilgpt2"}
SUPPORTED_MODEL_TYPES = ("gpt2", "gpt_neo")
_ALIAS_OF = {repo: name for name, repo in PRESET_REPOS.items()}    # older cache folders: models--gpt2
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9_.][\w.-]{0,95}$")
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index", ".json", ".ckpt", ".git")
_WEIGHT_SETS = (("model.safetensors", "model.safetensors.index.json"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json"))


# ================================================================================================
# The old preset cache ($MINIGPT_HOME)
# ================================================================================================
def cache_dir() -> Path:
    """$MINIGPT_HOME, default ~/.cache/minigpt (presets downloaded by older minigpt versions)."""
    return Path(os.environ.get("MINIGPT_HOME") or Path.home() / ".cache" / "minigpt").expanduser()


def preset_dir(name: str, cache: PathLike | None = None) -> Path:
    """The folder of preset `name` in the old minigpt cache `cache` (default cache_dir())."""
    return (Path(cache).expanduser() if cache is not None else cache_dir()) / name


def _in_minigpt_cache(name: str, cache: PathLike | None = None) -> bool:
    d = preset_dir(name, cache)
    return all((d / f).is_file() for f in PRESET_FILES)


def is_preset_cached(name: str, cache: PathLike | None = None) -> bool:
    """True when preset `name` loads with no download: from the old minigpt cache, or its Hub repo's main
    revision (with weights) from the Hugging Face cache."""
    if _in_minigpt_cache(name, cache):
        return True
    repo = PRESET_REPOS.get(name)
    return repo is not None and find_snapshot([repo, name], "main") is not None


# ================================================================================================
# Names
# ================================================================================================
def hub_repo_id(src: str) -> str | None:
    """The Hub repo a source names: a preset -> its repo; "ORG/NAME" -> itself; None for anything else
    (a bare name, a path with more parts, a file name such as out/model.safetensors)."""
    if src in PRESET_REPOS:
        return PRESET_REPOS[src]
    if not _REPO_RE.match(src) or "--" in src or ".." in src or src.lower().endswith(_FILE_SUFFIXES):
        return None
    return src


# ================================================================================================
# A revision's files: config.json (model_type checked), then the weights
# ================================================================================================
def _read_config(path: Path, repo_id: str) -> dict:
    """A JSON file of the repo (config.json, the shard index), errors naming the repo and the file."""
    return read_json_object(path, CheckpointError, f"{repo_id}: {path.name}")


def check_model_type(cfg: dict, repo_id: str) -> None:
    """CheckpointError unless config.json describes a model minigpt builds (SUPPORTED_MODEL_TYPES)."""
    mt = cfg.get("model_type")
    if mt is None and {"n_embd", "n_layer", "n_head"} <= cfg.keys():
        mt = "gpt2"                                   # GPT-2 configs from before model_type existed
    if mt not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{repo_id}: model_type {mt!r} is not supported; minigpt loads model_type 'gpt2' "
                              "(GPT-2, DistilGPT2, DialoGPT, Cerebras-GPT, GPT-2 fine-tunes) and 'gpt_neo' (GPT-Neo)")


def _meta_or_mark(repo_id: str, filename: str, commit: str, folder: Path) -> FileMeta | None:
    if (folder / ".no_exist" / commit / filename).exists():
        return None
    meta = file_meta(repo_id, filename, commit)
    if meta is None:
        hf_cache.mark_no_exist(folder, commit, filename)
    return meta


def _remote_weights(repo_id: str, commit: str, folder: Path, revision: str) -> list[FileMeta]:
    """The weight files of `commit`: model.safetensors, else its index + shards, else pytorch_model.bin
    (or its index + shards). Downloads the index; HEAD only for the rest."""
    for single, index in _WEIGHT_SETS:
        meta = _meta_or_mark(repo_id, single, commit, folder)
        if meta is not None:
            return [meta]
        imeta = _meta_or_mark(repo_id, index, commit, folder)
        if imeta is None:
            continue
        try:
            weight_map = _read_config(fetch(folder, imeta), repo_id).get("weight_map") or {}
            shards = sorted({hf_cache.safe_relpath(v) for v in weight_map.values()})
        except (AttributeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{repo_id}: {index} has no usable weight_map ({e})") from None
        metas = [imeta]
        for s in shards:
            m = file_meta(repo_id, s, commit)
            if m is None:
                raise CheckpointError(f"{repo_id} (revision {revision}): {index} names {s}, which is not in the repo")
            metas.append(m)
        if len(metas) > 1:
            return metas
    raise CheckpointError(f"{repo_id} (revision {revision}) has no weights: none of model.safetensors, "
                          "model.safetensors.index.json, pytorch_model.bin is in the repo")


def _download_snapshot(repo_id: str, revision: str, folder: Path) -> Path:
    """config.json first (its model_type checked), then the weights, of `revision`; refs/REVISION last."""
    meta = file_meta(repo_id, "config.json", revision)
    if meta is None:
        raise CheckpointError(f"{repo_id} (revision {revision}) has no config.json: not a transformers model repo")
    commit = meta.commit
    snap = folder / "snapshots" / commit
    check_model_type(_read_config(fetch(folder, meta), repo_id), repo_id)
    if hf_cache.snapshot_weight_files(snap) is None:
        for m in _remote_weights(repo_id, commit, folder, revision):
            fetch(folder, m)
    hf_cache.write_ref(folder, revision, commit)
    return snap


def snapshot_download(repo_id: str, revision: str | None = None, *, allowed: bool = True,
                      aliases: tuple[str, ...] = (), hint: str = "") -> Path:
    """The local snapshot folder of `repo_id` at `revision` (default main) in the Hugging Face cache: taken as
    it is when cached with its weights (also under older repo names, `aliases`), else downloaded (unless
    offline or allowed=False). Every failure is a one-line CheckpointError; `hint` ends the not-cached ones."""
    rev = revision or "main"
    try:
        hf_cache.safe_relpath(rev)
    except ValueError:
        raise CheckpointError(f"invalid revision {rev!r}: give a branch, a tag or a commit sha") from None
    root = hf_cache_dir()
    hit = find_snapshot([repo_id, *aliases], rev, root)
    if hit is not None:
        check_model_type(_read_config(hit / "config.json", repo_id), repo_id)
        return hit
    where = f"{repo_id} (revision {rev}) is not in the Hugging Face cache {root}"
    why = offline() or (None if allowed else "downloads turned off")
    if why:
        raise CheckpointError(f"{where} and downloads are disabled ({why}): download it once while online "
                              f"(minigpt and transformers share that cache), or set HF_HUB_CACHE / HF_HOME to a "
                              f"cache that holds it{hint}")
    folder = repo_folder(repo_id, root)
    try:
        return _download_snapshot(repo_id, rev, folder)
    except NetError as e:
        raise CheckpointError(f"{where} and downloading {e.url} failed ({e.reason}); check the network and "
                              f"HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache only{hint}") from None
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        raise CheckpointError(f"cannot write the Hugging Face cache {root} ({e.strerror or e}{where}); set "
                              "HF_HUB_CACHE (or HF_HOME) to a folder you can write, or download there first") from None


def resolve_source(src: str, revision: str | None = None, *, cache: PathLike | None = None,
                   allowed: bool = True) -> Path | None:
    """The local folder a Hub name (a preset or "ORG/NAME") loads from, downloaded when needed; None when
    `src` is not a Hub name. cache: the old minigpt preset cache (default $MINIGPT_HOME)."""
    repo = hub_repo_id(src)
    if repo is None:
        return None
    preset = _ALIAS_OF.get(repo)
    old = preset in PRESETS and PRESETS[preset].get("arch", "gpt2") == "gpt2"     # what older minigpt cached
    if old and revision in (None, "main") and _in_minigpt_cache(preset, cache):
        return preset_dir(preset, cache)
    hint = (f"; or put {preset}/config.json and {preset}/model.safetensors in the old minigpt cache "
            f"MINIGPT_HOME ({preset_dir(preset, cache).parent})") if old else ""
    return snapshot_download(repo, revision, allowed=allowed, aliases=(preset,) if preset else (), hint=hint)
