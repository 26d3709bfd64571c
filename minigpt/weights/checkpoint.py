"""Loading and saving whole models: find the files, build the config, fill the model strictly.

Sources accepted by `load_model(src, model_cls=...)` (what `GPT.from_pretrained` calls):

* a Hub name: "ORG/NAME" (model_type gpt2 or gpt_neo) or a preset name ("gpt2", "gpt2-medium",
  "gpt2-large", "gpt2-xl" = openai-community/<name>), at `revision` (branch, tag or commit; default
  main): a snapshot folder of the Hugging Face cache shared with transformers, downloaded once when
  missing (minigpt.weights.hub), or a preset in the old minigpt cache ($MINIGPT_HOME);
* a Hugging Face GPT-2 directory: config.json + model.safetensors (or a sharded
  model.safetensors.index.json, or pytorch_model.bin read with `torch.load(weights_only=True)`);
  keys with or without the `transformer.` prefix, Conv1D (in, out) weights;
* a single .safetensors/.bin file: the config comes from a config.json next to it, else it is
  inferred from the tensor shapes with n_head = n_embd // 64 (true for every GPT-2 size) unless
  `n_head=` is passed;
* an OpenAI TF checkpoint directory (hparams.json + model.ckpt.index + model.ckpt.data-*), a
  `.index` file or a checkpoint prefix: read by minigpt.weights.tfbundle, no TensorFlow;
* a directory written by `save_model` / `GPT.save_pretrained` (same layout as the HF one);
* a llama.cpp `.gguf` file of architecture gpt2 (f32/f16/bf16/q8_0, dequantized; minigpt.weights.gguf).

Every state dict is converted to minigpt's layout by minigpt.weights.keymap. This module does not import
minigpt.model.gpt: the model class is passed in (`model_cls`), so `GPT.from_pretrained` can call it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..fileio import atomic_write, atomic_write_text, read_json_object
from ..model.config import PRESETS, GPTConfig
from .hub import resolve_source
from .keymap import hf_to_minigpt, is_gpt_neo, minigpt_to_hf, openai_to_minigpt
from .tfbundle import bundle_prefix, read_tf_bundle

PathLike = str | os.PathLike

__all__ = [
    "load_checkpoint",
    "load_model",
    "load_state_dict_any",
    "model_from_state_dict",
    "read_tensors",
    "save_model",
]

_BLOCK_RE = re.compile(r"^transformer\.h\.(\d+)\.")


# ================================================================================================
# Reading tensors from files and directories
# ================================================================================================
def read_tensors(path: PathLike) -> dict[str, torch.Tensor]:
    """Raw tensors of a .safetensors file or a torch .bin/.pt/.pth file (weights_only, no code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupted?): "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:   # pickle.UnpicklingError for anything but plain tensors/containers
        msg = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0]) if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "UnpicklingError" in type(e).__name__:
            raise CheckpointError(f"{path}: refused to load: the file holds Python objects other than "
                                  f"tensors and weights_only=True loading rejected it ({msg[:200]})") from e
        raise CheckpointError(f"{path}: unreadable torch checkpoint (truncated or corrupted?): {msg[:200]}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    return dict(obj)


def _read_json(path: Path) -> dict:
    return read_json_object(path, CheckpointError)


def _hf_weight_files(d: Path) -> list[Path]:
    """Weight files of an HF-layout directory, safetensors preferred."""
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    idx = d / "model.safetensors.index.json"
    if idx.is_file():
        shards = sorted(set(_read_json(idx).get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{idx}: empty weight_map")
        return [d / s for s in shards]
    if (d / "pytorch_model.bin").is_file():
        return [d / "pytorch_model.bin"]
    idx = d / "pytorch_model.bin.index.json"
    if idx.is_file():
        return [d / s for s in sorted(set(_read_json(idx).get("weight_map", {}).values()))]
    return []


def _is_tf_dir(d: Path) -> bool:
    return (d / "hparams.json").is_file() and any(d.glob("*.index"))


def load_state_dict_any(path: PathLike) -> dict[str, torch.Tensor]:
    """Tensors in minigpt layout from any supported file or directory (no config, no model)."""
    return load_checkpoint(path, need_config=False)[1]


def _config_from_hparams(h: dict) -> GPTConfig:
    try:
        return _named(GPTConfig(n_layer=h["n_layer"], n_head=h["n_head"], n_embd=h["n_embd"],
                                block_size=h["n_ctx"], vocab_size=h["n_vocab"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"hparams.json: invalid or incomplete ({e!r}); needs n_vocab, n_ctx, "
                              "n_embd, n_head, n_layer") from e


def _named(cfg: GPTConfig) -> GPTConfig:
    """Give a config the preset's name when its shape is exactly a preset's."""
    if cfg.name == "custom":
        for name, p in PRESETS.items():
            if (cfg.arch, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size) == \
                    (p.get("arch", "gpt2"), p["n_layer"], p["n_head"], p["n_embd"], 50257, p.get("block_size", 1024)):
                cfg.name = name
    return cfg


def _config_from_json(path: Path) -> GPTConfig:
    try:
        return _named(GPTConfig.from_hf_dict(_read_json(path)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a usable GPT-2 config ({e})") from e


def _infer_config(sd: dict, n_head: int | None, origin: str) -> GPTConfig:
    """Config from tensor shapes (minigpt layout). n_head defaults to n_embd // 64."""
    try:
        vocab_size, n_embd = sd["transformer.wte.weight"].shape
        block_size = sd["transformer.wpe.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{origin}: missing tensor {e.args[0]}; cannot infer the model shape") from e
    layers = {int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))}
    n_layer = max(layers) + 1 if layers else 0
    arch = "gpt_neo" if is_gpt_neo(sd) else "gpt2"
    if arch == "gpt_neo":           # GPT-Neo's heads are not 64 wide (1.3B: 128): a preset's shape, or config.json
        if n_head is None:
            n_head = next((p["n_head"] for p in PRESETS.values() if p.get("arch") == "gpt_neo"
                           and (p["n_layer"], p["n_embd"]) == (n_layer, n_embd)), None)
        if n_head is None:
            raise CheckpointError(f"{origin}: cannot infer n_head of a GPT-Neo of n_embd={n_embd}; put its "
                                  "config.json next to the weights or pass n_head=")
    if n_head is None:
        if n_embd % 64:
            raise CheckpointError(f"{origin}: cannot infer n_head for n_embd={n_embd}; pass n_head= "
                                  "or put a config.json next to the weights")
        n_head = n_embd // 64
    try:
        return _named(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                                vocab_size=vocab_size, arch=arch))
    except ValueError as e:
        raise CheckpointError(f"{origin}: inferred config is invalid ({e})") from e


def load_checkpoint(src: PathLike, *, n_head: int | None = None, need_config: bool = True,
                    cache: PathLike | None = None, download: bool = True, revision: str | None = None
                    ) -> tuple[GPTConfig | None, dict[str, torch.Tensor]]:
    """Resolve `src` (see module docstring) -> (GPTConfig, state dict in minigpt layout)."""
    path = Path(src).expanduser() if isinstance(src, (str, os.PathLike)) else None
    if path is None:
        raise CheckpointError(f"unsupported checkpoint source of type {type(src).__name__}")
    if not path.exists():
        if Path(f"{path}.index").is_file():                         # a TF checkpoint prefix
            return _load_tf(path)
        d = resolve_source(src, revision, cache=cache, allowed=download) if isinstance(src, str) else None
        if d is not None:                                           # a Hub name: its snapshot folder
            return load_checkpoint(d, n_head=n_head, need_config=need_config)
        if isinstance(src, str) and os.sep not in src and "/" not in src and not src.startswith("."):
            raise CheckpointError(f"unknown checkpoint source {src!r}: not an existing path nor a preset "
                                  f"({', '.join(PRESETS)}) nor a Hub name (ORG/NAME)")
        raise CheckpointError(f"checkpoint path not found: {path}")
    if revision not in (None, "main"):
        raise CheckpointError(f"revision {revision!r} applies to Hub names (ORG/NAME); {src} is a local path")

    if path.is_file():
        if path.suffix == ".index":
            return _load_tf(path)
        if path.suffix == ".gguf":                                  # llama.cpp's format (minigpt.weights.gguf)
            from .gguf.load import load_gguf_checkpoint
            cfg, sd = load_gguf_checkpoint(path)
            return (_named(cfg) if need_config else None), sd
        if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise CheckpointError(f"{path}: unknown checkpoint file type (expected .safetensors, .bin, "
                                  ".pt, .pth, .gguf or a TF .index)")
        sd = hf_to_minigpt(read_tensors(path))
        cfg_path = path.parent / "config.json"
        if not need_config:
            return None, sd
        if n_head is None and cfg_path.is_file():
            cfg = _config_from_json(cfg_path)
        else:
            cfg = _infer_config(sd, n_head, str(path))
        return cfg, sd

    # a directory
    files = _hf_weight_files(path)
    if files:
        sd = {}
        for f in files:
            sd.update(read_tensors(f))
        sd = hf_to_minigpt(sd)
        if not need_config:
            return None, sd
        if (path / "config.json").is_file():
            cfg = _config_from_json(path / "config.json")
            if n_head is not None and n_head != cfg.n_head:
                raise CheckpointError(f"{path}: n_head={n_head} contradicts config.json (n_head={cfg.n_head})")
        else:
            cfg = _infer_config(sd, n_head, str(path))
        return cfg, sd
    if _is_tf_dir(path) or any(path.glob("*.index")):
        return _load_tf(path)
    present = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "empty"
    raise CheckpointError(f"{path}: no checkpoint found (expected config.json + model.safetensors / "
                          f"pytorch_model.bin, or hparams.json + model.ckpt.index; found: {present})")


def _load_tf(src: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    prefix = bundle_prefix(src)
    hp = prefix.parent / "hparams.json"
    tensors = read_tf_bundle(prefix)
    sd = openai_to_minigpt(tensors)
    if hp.is_file():
        cfg = _config_from_hparams(_read_json(hp))
    else:
        cfg = _infer_config(sd, None, str(prefix))
    return cfg, sd


# ================================================================================================
# Building the model strictly from a state dict
# ================================================================================================
def model_from_state_dict(cfg: GPTConfig, sd: dict, *, model_cls: type, dtype: torch.dtype | None = None,
                          device=None, origin: str = "checkpoint", consume: bool = False):
    """A `model_cls(cfg)` (a GPT) with every parameter taken from `sd` (minigpt layout); strict
    about keys and shapes.

    Floating tensors are cast to `dtype` (default float32), moved to `device` and made contiguous;
    the model is in eval mode. consume=True pops tensors from `sd` as it goes (lower peak memory).
    """
    dtype = dtype or torch.float32
    with torch.device("meta"):
        model = model_cls(cfg)
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and k != "lm_head.weight"]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{origin}: missing tensors {', '.join(missing[:3])}{more} for a "
                              f"{cfg.n_layer}-layer model")
    if unexpected:
        more = f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise CheckpointError(f"{origin}: unexpected tensors {', '.join(unexpected[:3])}{more} "
                              f"(config says n_layer={cfg.n_layer})")
    # with consume=True the tensors come from a file read for this model (often memory-mapped): when
    # some of them must be converted (GPT-2's transposed Conv1D weights, a cast), every one is copied,
    # so no view keeps the file's mapping alive, whose pages would otherwise stay resident next to
    # the converted copies (~325 MB more RSS for GPT-2 124M)
    own = consume and any(sd[k].dtype != dtype or not sd[k].is_contiguous() or
                          (device is not None and sd[k].device != torch.device(device))
                          for k in expected if k in sd)
    new_sd = {}
    for k, ref in expected.items():
        t = sd[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{origin}: tensor {k} has shape {list(t.shape)} but the config "
                                  f"(n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, vocab_size={cfg.vocab_size}, "
                                  f"block_size={cfg.block_size}) needs {list(ref.shape)}")
        if not t.is_floating_point():
            raise CheckpointError(f"{origin}: tensor {k} has non-floating dtype {t.dtype}")
        if consume:
            del sd[k]
        new = t.to(device=device, dtype=dtype).contiguous()
        if own and new.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            new = new.clone()
        new_sd[k] = new
        del t, new
    new_sd["lm_head.weight"] = new_sd["transformer.wte.weight"]
    model.load_state_dict(new_sd, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight          # keep the tie after assign
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def load_model(src, *, model_cls: type, dtype: torch.dtype | None = None, device=None,
               n_head: int | None = None, cache_dir: PathLike | None = None, download: bool = True,
               revision: str | None = None):
    """Load a model from a Hub name or preset, HF dir/file, OpenAI TF checkpoint or save_pretrained dir.

    Outside minigpt.model.gpt call `GPT.from_pretrained(src, ...)`, which passes itself as model_cls.

    model_cls: the model class (GPT or a subclass), built as model_cls(config).
    dtype:     floating dtype of the parameters (default float32).
    device:    where to put them (default cpu).
    n_head:    for a bare weights file without config.json (default n_embd // 64).
    cache_dir: the old minigpt preset cache (default $MINIGPT_HOME or ~/.cache/minigpt); Hub models live
               in the Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub).
    download:  allow downloading a Hub model that is not cached.
    revision:  of a Hub name: a branch, tag or commit sha (default main).
    """
    cfg, sd = load_checkpoint(src, n_head=n_head, cache=cache_dir, download=download, revision=revision)
    return model_from_state_dict(cfg, sd, model_cls=model_cls, dtype=dtype, device=device, origin=str(src),
                                 consume=True)


# ================================================================================================
# Saving
# ================================================================================================
def save_model(model, out_dir: PathLike) -> None:
    """Write config.json + model.safetensors in the HF Hub layout (GPT-2: Conv1D weights; prefixed
    keys, no lm_head) so that transformers.GPT2LMHeadModel (GPT-Neo: GPTNeoForCausalLM)
    .from_pretrained(out_dir) loads it. Atomic."""
    from safetensors.torch import save_file

    from ..model.quant import is_quantized

    if is_quantized(model):
        raise CheckpointError("a quantized (nf4/int8) model cannot be saved as GPT-2 weights: save its LoRA "
                              "adapter (save_adapter), or merge into the full-precision base and save that")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    expected = {"lm_head.weight", "transformer.wte.weight", "transformer.wpe.weight",
                "transformer.ln_f.weight", "transformer.ln_f.bias"}
    attn = r"attn\.c_attn|attn\.c_proj" if model.config.arch == "gpt2" else r"attn\.attention\.(?:[qkv]|out)_proj"
    extra = [k for k in sd if k not in expected and not re.fullmatch(
        rf"transformer\.h\.\d+\.(ln_1|ln_2|{attn}|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)", k)]
    if extra:
        raise CheckpointError(f"model has non-GPT-2 tensors ({', '.join(extra[:3])}); merge the adapter "
                              "first (minigpt.methods.merge_and_unload: LoRA, DoRA, IA3) or save it with "
                              "minigpt.methods.save_adapter (prefix/prompt tuning, bottleneck adapters do not merge)")
    tensors = {k: v.detach().to("cpu") for k, v in minigpt_to_hf(sd).items()}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    cfg = model.config.to_hf_dict()
    dt = str(model.dtype).replace("torch.", "")
    cfg.setdefault("dtype", dt)
    cfg.setdefault("torch_dtype", dt)
    atomic_write(out / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
