"""Run folders: what each command writes into its --out-dir, whether a folder may be used, what
--overwrite may delete, and finding and loading finished runs (one policy for every command),
including the model that chat, serve and export use (`load_chat_model`).

A run folder holds `run.json` (written first by `claim_run_dir`, then by the Trainer:
{"kind": "pretrain" | "finetune", "train": ..., ...}) and the latest weights at its top level:

* pretraining / full fine-tuning: config.json + model.safetensors (GPT.from_pretrained reads it)
* parameter-efficient fine-tuning (any minigpt.methods method): adapter_config.json +
  adapter_model.safetensors (PEFT's layout where PEFT has the method)

finetune writes `minigpt_finetune.json` (FINETUNE_META) with what is needed to use the result:
{"kind": "finetune", "method": "full" | one of minigpt.methods.METHODS, "peft": {...} | null,
"base": base source, "template": name, "mask_prompt", "max_length", "lora": {...} | null,
"merged": "merged" | null, ...}.

    claim_run_dir("out", "pretrain", inputs=[RunInput("--init-from", "m1/best", model=True)])
    model, template = load_finetuned("out-finetune")     # base + adapter, or the full weights
    run = find_latest_run("pretrain")                     # e.g. Path("out"), or None
    loaded = load_chat_model()                            # newest finetune run, else pretrain run

Model sources of `load_chat_model` (`minigpt chat`, `serve` and `export`):
* `--model` = any GPT.from_pretrained source (preset, HF dir, OpenAI TF checkpoint, train.py out/);
* `--adapter` = an adapter dir (minigpt's or PEFT's); its base is `--model`, else the base the
  adapter records (minigpt_finetune.json, else adapter_config.json's base_model_name_or_path);
* a finetune.py output dir (adapter or full weights + minigpt_finetune.json) given as either;
  the template is read from its metadata;
* nothing: the newest finetune.py output (./out-finetune, ...), else the newest train.py output
  (./out, ...).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..data.templates import DEFAULT_TEMPLATE
from ..errors import ChatError, CheckpointError, RunDirError
from ..fileio import atomic_write_json

__all__ = ["FINETUNE_META", "RUN_INFO", "METRICS_FILE", "CKPT_DIR", "STATE_FILE", "RUN_OUTPUTS",
           "RunInput", "check_run_dir", "claim_run_dir", "latest_checkpoint", "read_run_info", "read_finetune_meta",
           "has_model", "has_adapter", "find_latest_run", "resolve_base", "load_finetuned", "LoadedModel",
           "load_chat_model", "NO_MODEL_MESSAGE"]

RUN_INFO = "run.json"
FINETUNE_META = "minigpt_finetune.json"
METRICS_FILE = "metrics.jsonl"
CKPT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"            # inside each checkpoints/step-N folder
MODEL_FILES = ("config.json", "model.safetensors")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
DATA_CACHE = "data"                        # tokenised corpus, keyed by its fingerprint: kept

# Every file and folder each kind of run writes at the top of its --out-dir. A fresh run (or
# --overwrite) deletes the names of ALL kinds that are present, so nothing of an earlier run of
# another kind is left behind (e.g. an adapter beside new full weights).
RUN_OUTPUTS: dict[str, tuple[str, ...]] = {
    "pretrain": (RUN_INFO, METRICS_FILE, "loss.png", *MODEL_FILES, CKPT_DIR, "best", DATA_CACHE),
    "finetune": (RUN_INFO, METRICS_FILE, "loss.png", *MODEL_FILES, *ADAPTER_FILES, FINETUNE_META,
                 "samples.json", CKPT_DIR, "best", "merged"),
}
_ALL_OUTPUTS = tuple(dict.fromkeys(n for names in RUN_OUTPUTS.values() for n in names))
_RESULTS = (*MODEL_FILES, *ADAPTER_FILES, CKPT_DIR, "best", "merged")   # what a finished run holds
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


# --- the run-folder policy ----------------------------------------------------------------------

@dataclass(frozen=True)
class RunInput:
    """Something a run reads: a flag's value. For a model (model=True) given as a weights file,
    the folder beside it is read too (its config.json)."""

    flag: str                  # e.g. "--init-from", "--base", "--data"
    path: Optional[PathLike]   # None or a preset name: nothing on disk to protect
    model: bool = False


def latest_checkpoint(out_dir: PathLike) -> Optional[Path]:
    """The newest complete checkpoint folder in out_dir/checkpoints (folders appear atomically)."""
    root = Path(out_dir) / CKPT_DIR
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit()
            and (p / STATE_FILE).exists()]
    return max(done, key=lambda p: int(p.name[5:]), default=None)


def _check_writable(out: Path) -> None:
    """out (or its nearest existing ancestor) must be a writable folder. Creates nothing."""
    q = out.absolute()
    while not q.exists() and q != q.parent:
        q = q.parent
    if not q.is_dir():
        raise RunDirError(f"cannot use --out-dir {out}: {q} is a file, not a folder")
    if not os.access(q, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot use --out-dir {out}: {q} is not writable")


def _check_inputs(out: Path, names: Sequence[str], inputs: Sequence[RunInput]) -> None:
    """Refuse when an input is the out folder itself or lies in one of the `names` inside it
    (resolved paths: symlinks and ../ cannot hide it)."""
    root = out.resolve()
    for inp in inputs:
        if inp.path is None or not Path(inp.path).expanduser().exists():
            continue
        p = Path(inp.path).expanduser().resolve()
        for q in (p, p.parent) if (inp.model and p.is_file()) else (p,):
            if q == root:
                raise RunDirError(f"{inp.flag} {inp.path} is the --out-dir folder {out}, whose files this run "
                                  "would replace: choose another --out-dir")
            if root in q.parents and q.relative_to(root).parts[0] in names:
                part = q.relative_to(root).parts[0]
                raise RunDirError(f"{inp.flag} {inp.path} lies in {out}/{part}, whose files this run would "
                                  "replace: choose another --out-dir (or copy the input out first)")


def check_run_dir(out_dir: PathLike, kind: str, *, resume: bool = False, overwrite: bool = False,
                  inputs: Sequence[RunInput] = (), main_process: bool = True) -> list[Path]:
    """Decide whether a run of `kind` may use out_dir; raise RunDirError (one line) if not.

    Returns what starting the run deletes (nothing for --resume). Changes nothing on disk.
    * an input (model or data) inside what the run writes or deletes is always refused;
    * --resume needs a checkpoint of a run of the same kind;
    * a fresh run refuses a folder holding an earlier run's results, or files that no minigpt
      command wrote (a folder without run.json), unless `overwrite`;
    * a fresh run deletes every output name of every kind that is present (RUN_OUTPUTS) except
      the data cache, so nothing of the earlier run survives beside the new one.
    Hidden entries (temp files of atomic writes) are ignored. Other processes of a distributed
    run (main_process=False) check only the folder and the inputs: their rank 0 claims it.
    """
    if kind not in RUN_OUTPUTS:
        raise ValueError(f"unknown run kind {kind!r} ({', '.join(RUN_OUTPUTS)})")
    out = Path(out_dir).expanduser()
    _check_writable(out)
    _check_inputs(out, _ALL_OUTPUTS, inputs)
    if not main_process:
        return []
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    have = _run_kind(out) if entries else None
    if resume:
        if have not in (None, kind):
            raise RunDirError(f"--resume: {out} holds a {have} run, not a {kind} run")
        if latest_checkpoint(out) is None:
            raise RunDirError(f"--resume: no checkpoint found in {out}/{CKPT_DIR}")
        return []
    if entries and not overwrite:
        if have is None and entries != [DATA_CACHE]:    # (the cache: other ranks of this run write it)
            raise RunDirError(f"--out-dir {out} holds files no minigpt run wrote ({', '.join(entries[:4])}"
                              f"{', ...' if len(entries) > 4 else ''}); choose another --out-dir, or pass "
                              "--overwrite to replace them")
        if have not in (None, kind):
            raise RunDirError(f"--out-dir {out} holds a {have} run; choose another --out-dir, or pass "
                              "--overwrite to replace it")
        done = [n for n in _RESULTS if n in entries]
        if done:
            raise RunDirError(f"--out-dir {out} already holds a {kind} run ({', '.join(done)}); pass --resume "
                              "to continue it, --overwrite to start over, or choose another --out-dir")
    return [out / n for n in _ALL_OUTPUTS if n in entries and n != DATA_CACHE]


def claim_run_dir(out_dir: PathLike, kind: str, *, resume: bool = False, overwrite: bool = False,
                  inputs: Sequence[RunInput] = (), main_process: bool = True) -> Path:
    """check_run_dir, then (fresh runs, main process only) delete what it names and mark the folder
    with run.json {"kind": kind}. Call it after every flag is validated and the inputs are loaded
    or checked: nothing may be deleted before a run can start."""
    doomed = check_run_dir(out_dir, kind, resume=resume, overwrite=overwrite, inputs=inputs,
                           main_process=main_process)
    out = Path(out_dir).expanduser()
    if main_process and not resume:
        for p in doomed:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_INFO, {"kind": kind})
    return out


def _newest_mtime(d: Path) -> float:
    files = [d / n for n in ("model.safetensors", "adapter_model.safetensors", RUN_INFO)]
    return max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)


def find_latest_run(kind: Optional[str] = None, root: PathLike = ".") -> Optional[Path]:
    """The most recently written complete run of `kind` ("pretrain" or "finetune") among `root`
    and its immediate subdirectories (e.g. ./out, ./out-finetune), or None. kind None: the newest
    finetune run, else the newest pretraining run (what chat loads when given no model).

    Complete means: the run's weights are there (config.json + model.safetensors; for finetune
    runs alternatively a LoRA adapter). Pretraining runs are recognised by run.json's
    "kind": "pretrain", fine-tuning runs by "kind": "finetune" or minigpt_finetune.json.
    """
    if kind is None:
        return find_latest_run("finetune", root) or find_latest_run("pretrain", root)
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
                   merge: bool = False, quantize: Optional[str] = None, revision: Optional[str] = None):
    """Load what finetune.py wrote: returns (model, template_name).

    path:  a finetune.py --out-dir (or one of its checkpoints/step-N folders, or its merged/
           folder). A LoRA run loads its base model (recorded in minigpt_finetune.json, else the
           adapter's base_model_name_or_path) and applies the adapter; a full fine-tune (or a
           merged folder) loads the weights directly.
    base:  override the recorded base model source (e.g. when it has moved).
    merge: fold the adapter into the weights (a plain GPT; faster to decode) where the method
           allows it (lora, dora, ia3; minigpt.methods.MERGEABLE); other methods stay attached.
    quantize: load the base quantized ("nf4" | "int8", minigpt.model.quant): the adapter then stays
           unmerged on it (as in QLoRA training); a full fine-tune is quantized after loading.
    revision: the Hub revision of the base (default: the one finetune.py recorded, else main).
    The model is returned in eval mode. template_name is the prompt template the run was trained
    with ("alpaca" when the folder carries no metadata).
    """
    from ..methods import MERGEABLE, adapter_method, load_adapter, merge_and_unload, read_config
    from ..model.gpt import GPT

    d = Path(path).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"fine-tuned model folder {str(d)!r} does not exist")
    meta = read_finetune_meta(d)
    if meta is None and d.parent.name == "checkpoints":       # out/checkpoints/step-N
        meta = read_finetune_meta(d.parent.parent)
    meta = meta or {}
    template = meta.get("template") or DEFAULT_TEMPLATE

    if has_adapter(d):
        src = base or meta.get("base") or read_config(d).get("base_model_name_or_path")
        if not src:
            raise CheckpointError(f"{d}: the adapter does not say which base model it was trained on; "
                                  "pass base=... (or --base)")
        if revision is None and not base:
            revision = meta.get("base_revision")
        try:
            model = GPT.from_pretrained(src, dtype=dtype, device=device, quantize=quantize, revision=revision)
        except CheckpointError as e:
            raise CheckpointError(f"base model of {d} could not be loaded: {e}") from e
        load_adapter(model, d)
        if merge and not quantize and adapter_method(d) in MERGEABLE:
            model = merge_and_unload(model)
    elif has_model(d) or (d / "config.json").is_file():
        model = GPT.from_pretrained(d, dtype=dtype, device=device, quantize=quantize)
    else:
        raise CheckpointError(f"{d}: no fine-tuned model found (expected adapter_config.json + "
                              "adapter_model.safetensors, or config.json + model.safetensors)")
    return model.eval(), template


# --- the model to talk to (chat, serve, export) ----------------------------------------------------

NO_MODEL_MESSAGE = ("no model to chat with: fine-tune one with `python finetune.py` (writes out-finetune/), "
                    "pretrain one with `python train.py` (writes out/), or pass --model gpt2 "
                    "(or any checkpoint directory)")


@dataclass
class LoadedModel:
    model: Any
    template: Optional[str]      # the template the model was tuned with (None when unknown)
    source: str                  # human-readable description
    adapter: Optional[str] = None


def _is_finetune_dir(d: Path) -> bool:
    return d.is_dir() and ((d / "adapter_config.json").is_file() or read_finetune_meta(d) is not None)


def load_chat_model(model: Optional[str] = None, adapter: Optional[str] = None, *,
                    device=None, root: PathLike = ".", merge: bool = True,
                    quantize: Optional[str] = None, revision: Optional[str] = None) -> LoadedModel:
    """Load what chat, serve and export use (see the module docstring for the sources).

    model:   any GPT.from_pretrained source, or a finetune.py output dir (LoRA or full).
    adapter: a LoRA adapter / finetune output dir applied to `model` (default base: the one the
             adapter records).
    neither: the newest finetune output under `root`, else the newest train.py output.
    revision: the Hub revision of a `model` given as ORG/NAME (or of the adapter's Hub base).
    LoRA adapters are merged into the weights for fast decoding (exactly what merge_lora gives)
    unless merge=False or the adapter touches the tied lm_head. Raises ChatError /
    CheckpointError / FileNotFoundError / ValueError with one-line messages.
    """
    from ..methods import MERGEABLE, merge_and_unload, method_of
    from ..methods.lora import lora_layers
    from ..model.gpt import GPT

    if model is None and adapter is None:
        latest = find_latest_run(root=root)
        if latest is None:
            raise ChatError(NO_MODEL_MESSAGE)
        model = str(latest)
    if adapter is None and model is not None and _is_finetune_dir(Path(model).expanduser()):
        model, adapter = None, model                          # a finetune output dir as --model
    if adapter is None:
        m = GPT.from_pretrained(model, device=device, quantize=quantize, revision=revision)
        template, source = None, str(model)
    else:
        ad = Path(adapter).expanduser()
        if not ad.is_dir():
            raise ChatError(f"adapter directory {adapter} not found")
        m, template = load_finetuned(ad, base=model, device=device, quantize=quantize, revision=revision)
        meta = read_finetune_meta(ad) or {}
        if not meta.get("template"):
            template = None                                   # load_finetuned says alpaca when it cannot know
        source = f"{model} + {adapter}" if model is not None else str(adapter)
        if merge and method_of(m) in MERGEABLE and not quantize:
            try:
                m = merge_and_unload(m)
            except ValueError:                                # LoRA on the tied lm_head: keep as is
                if not lora_layers(m):
                    raise
    if device is not None:
        m.to(device)
    m.eval()
    m.requires_grad_(False)
    return LoadedModel(m, template, source, adapter)
