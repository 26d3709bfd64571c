"""The command-line programs, as library code: `minigpt <command>` and the root train.py,
finetune.py, chat.py and serve.py shims all call `COMMANDS[name](argv)`.

    args.py      typed dataclass flags, the flags both training commands share, one-line errors
    common.py    what chat, serve and export share: loading the model, its decoding weights
    train.py     pretraining            finetune.py   instruction tuning (LoRA or full)
    finetune_pairs.py   finetune's preference objectives: the pairs, the reference
    chat.py      terminal chat          serve.py      OpenAI-compatible API + chat page
    export.py    GGUF for llama.cpp     eval.py       perplexity, bits per byte of a text
    info.py      versions, device, presets, cache
"""
from __future__ import annotations

import importlib

COMMANDS = {
    "train": "pretrain a GPT-2 model (default: a small one on the embedded Shakespeare corpus)",
    "finetune": "instruction-tune a model, with LoRA (--lora) or all weights",
    "chat": "chat with a model in the terminal (default: the newest local run)",
    "serve": "serve a model over an OpenAI-compatible API with a browser chat page",
    "export": "write a model (or a LoRA adapter) as a GGUF file for llama.cpp",
    "eval": "perplexity and bits per byte of a model on a text (sliding window)",
    "info": "versions, device, presets and the cache (also plain `minigpt`)",
}


def run(name: str, argv=None) -> int:
    """Run command `name` with argv (a list of strings; None = sys.argv[2:] semantics of main)."""
    return importlib.import_module(f"{__name__}.{name}").main(argv)
