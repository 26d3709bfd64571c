"""Finding and loading the outputs of train.py and finetune.py (shared by finetune.py and chat.py).

A run directory holds `run.json` (written by the Trainer: {"train": ..., "kind": "pretrain" |
"finetune", ...}) and the latest weights at its top level:

* pretraining / full fine-tuning: config.json + model.safetensors (GPT.from_pretrained reads it)
* LoRA fine-tuning: adapter_config.json + adapter_model.safetensors (PEFT layout)

finetune.py also writes `minigpt_finetune.json` (FINETUNE_META) with what is needed to use the
result: {"kind": "finetune", "method": "lora" | "full", "base": base source, "template": name,
"mask_prompt", "max_length", "lora": {...} | null, "merged": "merged" | null, ...}.

    model, template = load_finetuned("out-finetune")     # base + adapter, or the full weights
    run = find_latest_run("pretrain")                     # e.g. Path("out"), or None
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

from .checkpoint import CheckpointError

__all__ = ["FINETUNE_META", "RUN_INFO", "read_run_info", "read_finetune_meta", "has_model",
           "has_adapter", "find_latest_run", "resolve_base", "load_finetuned"]

FINETUNE_META = "minigpt_finetune.json"
RUN_INFO = "run.json"
DEFAULT_TEMPLATE = "alpaca"
PathLike = Union[str, os.PathLike]


def _read_json(path: Path) -> Optional[dict]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def read_run_info(run_dir: PathLike) -> Optional[dict]:
    """run.json of a train.py / finetune.py output directory, or None."""
    return _read_json(Path(run_dir) / RUN_INFO)


def read_finetune_meta(run_dir: PathLike) -> Optional[dict]:
    """minigpt_finetune.json of a finetune.py output directory, or None."""
    return _read_json(Path(run_dir) / FINETUNE_META)


def has_model(d: PathLike) -> bool:
    """True when `d` holds full weights (config.json + model.safetensors)."""
    d = Path(d)
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def has_adapter(d: PathLike) -> bool:
    """True when `d` holds a LoRA adapter (adapter_config.json + adapter_model.safetensors)."""
    d = Path(d)
    return (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()


def _run_kind(d: Path) -> Optional[str]:
    info = read_run_info(d)
    if info is not None and isinstance(info.get("kind"), str):
        return info["kind"]
    meta = read_finetune_meta(d)
    return "finetune" if meta is not None else None


def _newest_mtime(d: Path) -> float:
    files = [d / n for n in ("model.safetensors", "adapter_model.safetensors", RUN_INFO)]
    return max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)


def find_latest_run(kind: str, root: PathLike = ".") -> Optional[Path]:
    """The most recently written complete run of `kind` ("pretrain" or "finetune") among `root`
    and its immediate subdirectories (e.g. ./out, ./out-finetune), or None.

    Complete means: the run's weights are there (config.json + model.safetensors; for finetune
    runs alternatively a LoRA adapter). Pretraining runs are recognised by run.json's
    "kind": "pretrain", fine-tuning runs by "kind": "finetune" or minigpt_finetune.json.
    """
    if kind not in ("pretrain", "finetune"):
        raise ValueError(f"unknown run kind {kind!r} (pretrain or finetune)")
    root = Path(root)
    try:
        candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return None
    found = []
    for d in candidates:
        if _run_kind(d) != kind:
            continue
        if has_model(d) or (kind == "finetune" and has_adapter(d)):
            found.append(d)
    return max(found, key=_newest_mtime, default=None)


def resolve_base(src: str) -> str:
    """How a base-model source is recorded: an existing local path becomes absolute (so the
    fine-tuned run can be loaded from any working directory); preset names stay as they are."""
    p = Path(src).expanduser()
    return str(p.resolve()) if p.exists() else src


def load_finetuned(path: PathLike, *, base: Optional[str] = None, device=None, dtype=None,
                   merge: bool = False):
    """Load what finetune.py wrote: returns (model, template_name).

    path:  a finetune.py --out-dir (or one of its checkpoints/step-N folders, or its merged/
           folder). A LoRA run loads its base model (recorded in minigpt_finetune.json, else the
           adapter's base_model_name_or_path) and applies the adapter; a full fine-tune (or a
           merged folder) loads the weights directly.
    base:  override the recorded base model source (e.g. when it has moved).
    merge: fold the adapter into the weights (a plain GPT; faster to decode).
    The model is returned in eval mode. template_name is the prompt template the run was trained
    with ("alpaca" when the folder carries no metadata).
    """
    from .lora import load_adapter, merge_and_unload, read_adapter_config
    from .model import GPT

    d = Path(path).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"fine-tuned model folder {str(d)!r} does not exist")
    meta = read_finetune_meta(d)
    if meta is None and d.parent.name == "checkpoints":       # out/checkpoints/step-N
        meta = read_finetune_meta(d.parent.parent)
    meta = meta or {}
    template = meta.get("template") or DEFAULT_TEMPLATE

    if has_adapter(d):
        src = base or meta.get("base") or read_adapter_config(d).get("base_model_name_or_path")
        if not src:
            raise CheckpointError(f"{d}: the adapter does not say which base model it was trained on; "
                                  "pass base=... (or --base)")
        try:
            model = GPT.from_pretrained(src, dtype=dtype, device=device)
        except CheckpointError as e:
            raise CheckpointError(f"base model of {d} could not be loaded: {e}") from e
        load_adapter(model, d)
        if merge:
            model = merge_and_unload(model)
    elif has_model(d) or (d / "config.json").is_file():
        model = GPT.from_pretrained(d, dtype=dtype, device=device)
    else:
        raise CheckpointError(f"{d}: no fine-tuned model found (expected adapter_config.json + "
                              "adapter_model.safetensors, or config.json + model.safetensors)")
    return model.eval(), template
