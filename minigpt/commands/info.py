"""`minigpt info` (also plain `minigpt`): version, device, the caches (Hugging Face's, shared with transformers,
and the old minigpt one), presets and where they are cached."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

SOURCES = (
    "Hub name ORG/NAME (model_type gpt2 or gpt_neo; revision=branch|tag|commit): Hugging Face cache, "
    "downloaded once when online",
    "preset name: gpt2, gpt2-medium, gpt2-large, gpt2-xl = openai-community/<name> on the Hub",
    "Hugging Face GPT-2 dir: config.json + model.safetensors | pytorch_model.bin",
    "single weights file: *.safetensors | *.bin (config.json beside it, else inferred)",
    "OpenAI TF checkpoint dir: hparams.json + model.ckpt.index + model.ckpt.data-00000-of-00001",
    "minigpt save_pretrained / training output dir (same layout as Hugging Face)",
)


def param_count(n_layer: int, n_embd: int, vocab_size: int = 50257, block_size: int = 1024,
                arch: str = "gpt2") -> int:
    """GPT-2 (or GPT-Neo: no q/k/v biases) parameters with the tied head counted once."""
    per_block = 12 * n_embd * n_embd + (13 if arch == "gpt2" else 10) * n_embd
    return vocab_size * n_embd + block_size * n_embd + n_layer * per_block + 2 * n_embd


def _device_line() -> str:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"cuda ({', '.join(names)})"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="minigpt info", description="Show minigpt's environment: versions, "
                                     "device, presets and where they are cached.")
    parser.parse_args(list(argv) if argv is not None else None)

    import torch

    from .. import __version__
    from ..model.config import PRESETS
    from ..weights.hf_cache import find_snapshot, hf_cache_dir
    from ..weights.hub import PRESET_FILES, PRESET_REPOS, cache_dir, preset_dir

    out = sys.stdout
    print(f"minigpt {__version__}", file=out)
    print(f"python  {sys.version.split()[0]}", file=out)
    print(f"torch   {torch.__version__}", file=out)
    print(f"device  {_device_line()}", file=out)
    hf = hf_cache_dir()
    env = next((v for v in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME") if os.environ.get(v)), None)
    print(f"hub cache {hf} ({env or 'default'}; shared with transformers; set HF_HUB_CACHE or HF_HOME to "
          "change)", file=out)
    home = cache_dir()
    src = "MINIGPT_HOME" if os.environ.get("MINIGPT_HOME") else "default; set MINIGPT_HOME to change"
    print(f"cache   {home} (presets of older minigpt versions; {src})", file=out)
    print("presets:", file=out)
    for name, p in PRESETS.items():
        n = param_count(p["n_layer"], p["n_embd"], block_size=p.get("block_size", 1024), arch=p.get("arch", "gpt2"))
        old, repo = preset_dir(name), PRESET_REPOS[name]
        if all((old / f).is_file() for f in PRESET_FILES):
            where = f"cached at {old}"
        elif (snap := find_snapshot([repo, name], "main")) is not None:
            where = f"cached at {snap}"
        else:
            where = f"not cached ({repo})"
        print(f"  {name:<12} {n:>13,} params  {p['n_layer']:>2} layers {p['n_head']:>2} heads "
              f"{p['n_embd']:>4} dims  {where}", file=out)
    print("GPT.from_pretrained(src) accepts:", file=out)
    for s in SOURCES:
        print(f"  - {s}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
