"""Write a model as a GGUF file that llama.cpp runs (llama-cli, llama-server, llama-cpp-python,
ollama), with GPT-2's tokenizer and the chat template the model was tuned with. A LoRA adapter is
merged into the weights, or written as a llama.cpp LoRA GGUF of its own with --lora-gguf.

examples:
  minigpt export --gguf model.gguf --model out-finetune             # LoRA merged, f16
  minigpt export --gguf model-q8.gguf --model gpt2 --dtype q8_0
  minigpt export --gguf base.gguf --lora-gguf adapter.gguf --model out-finetune
  llama-cli -m model.gguf -cnv                                      # chat with the embedded template
  llama-cli -m base.gguf --lora adapter.gguf -p "### Instruction:"
(`python -m minigpt export ...` is the same command. GPT.from_pretrained("model.gguf") reads the
file back.)
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..data.templates import TEMPLATE_NAMES
from ..errors import AdapterError
from .args import CLIError, command_main, field

DTYPES = ("f32", "f16", "bf16", "q8_0")
# adapter kinds that add virtual tokens or modules instead of changing weights: nothing to merge,
# and llama.cpp has no way to apply them
_UNEXPORTABLE_METHODS = {"prefix": "prefix-tuning", "prompt": "prompt-tuning", "adapter": "bottleneck-adapter"}
_UNEXPORTABLE_PEFT = {"PREFIX_TUNING": "prefix-tuning", "PROMPT_TUNING": "prompt-tuning", "P_TUNING": "p-tuning",
                      "ADAPTION_PROMPT": "adaption-prompt"}


@dataclass
class ExportArgs:
    gguf: Optional[str] = field(None, "the model GGUF file to write", metavar="OUT.gguf")
    model: Optional[str] = field(None, "any GPT.from_pretrained source (Hub name ORG/NAME, preset, folder, .gguf) "
                                       "or a finetune output folder (default: newest out-finetune/, else out/)",
                                 metavar="SRC")
    revision: Optional[str] = field(None, "Hub revision of a --model ORG/NAME (or of the adapter's Hub base): "
                                          "a branch, tag or commit sha (default: main)", metavar="REV")
    adapter: Optional[str] = field(None, "adapter folder (minigpt's or PEFT's) applied to --model: LoRA, "
                                         "DoRA or IA3, merged",
                                   metavar="DIR")
    dtype: str = field("f16", "weights in the model file: f32, f16, bf16 or q8_0 (8-bit blocks of 32)",
                       choices=DTYPES)
    lora_gguf: Optional[str] = field(None, "also write the LoRA adapter as a llama.cpp LoRA GGUF (llama.cpp "
                                           "--lora); --gguf then holds the base weights, unmerged",
                                     metavar="OUT.gguf")
    template: Optional[str] = field(None, "chat template to embed (default: the one the model was tuned with, "
                                          "else alpaca)", choices=TEMPLATE_NAMES)
    name: Optional[str] = field(None, "general.name in the file (default: the model's name)")
    overwrite: bool = field(False, "replace output files that exist")
    debug: bool = field(False, "show tracebacks")

    def __post_init__(self) -> None:
        if not self.gguf and not self.lora_gguf:
            raise ValueError("--gguf OUT.gguf is required (or --lora-gguf for the adapter alone)")
        if self.gguf and self.lora_gguf and Path(self.gguf).resolve() == Path(self.lora_gguf).resolve():
            raise ValueError("--gguf and --lora-gguf must be different files")


def _check_outputs(args: ExportArgs) -> None:
    for flag, out in (("--gguf", args.gguf), ("--lora-gguf", args.lora_gguf)):
        if not out:
            continue
        p = Path(out).expanduser()
        if p.is_dir():
            raise CLIError(f"{flag} {out}: is a folder; give a file name such as model.gguf")
        if not p.parent.is_dir():
            raise CLIError(f"{flag} {out}: folder {p.parent} does not exist")
        if p.exists() and not args.overwrite:
            raise CLIError(f"{flag} {out} exists; pass --overwrite to replace it")


def _read_json(p: Path) -> dict:
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _check_adapter_kind(args: ExportArgs) -> None:
    """One-line refusal for adapters llama.cpp cannot apply (virtual tokens, extra modules)."""
    for src in (args.adapter, args.model):
        d = Path(src).expanduser() if src else None
        if d is None or not d.is_dir():
            continue
        method = _read_json(d / "minigpt_finetune.json").get("method")
        peft_type = _read_json(d / "adapter_config.json").get("peft_type")
        kind = _UNEXPORTABLE_METHODS.get(method) or _UNEXPORTABLE_PEFT.get(peft_type)
        if kind:
            raise AdapterError(f"{d}: a {kind} adapter adds learned virtual tokens or modules that llama.cpp "
                               "cannot apply and that do not merge into GPT-2's weights; GGUF export needs "
                               "a full fine-tune or a LoRA, DoRA or IA3 adapter")
        if args.lora_gguf and (method not in (None, "lora") or peft_type not in (None, "LORA")
                               or _read_json(d / "adapter_config.json").get("use_dora")):
            raise AdapterError(f"{d}: a llama.cpp LoRA GGUF holds plain LoRA pairs only; export this "
                               f"{method or peft_type} adapter merged (leave out --lora-gguf)")


def export(args: ExportArgs) -> int:
    """The body of `minigpt export`: check, load (LoRA merged unless --lora-gguf), write."""
    from ..methods.lora import lora_layers
    from ..weights.gguf import export_gguf, export_lora_gguf
    from .common import load_model

    _check_outputs(args)
    _check_adapter_kind(args)
    loaded, template = load_model(args, "cpu", merge=not args.lora_gguf)
    model = loaded.model
    name = args.name or Path(str(args.adapter or loaded.source).split(" + ")[-1]).name or None
    if args.lora_gguf:
        if not lora_layers(model):
            raise CLIError("--lora-gguf needs a LoRA adapter: pass --adapter DIR or a LoRA finetune folder "
                           "as --model")
        export_lora_gguf(model, args.lora_gguf, name=name)
        print(f"wrote {args.lora_gguf} (LoRA adapter, {len(lora_layers(model))} matrices)")
    if args.gguf:
        export_gguf(model, args.gguf, args.dtype, template=template, name=name, merge=not args.lora_gguf)
        size = Path(args.gguf).stat().st_size / 2 ** 20
        what = "base weights" if args.lora_gguf else "weights"
        print(f"wrote {args.gguf} ({loaded.source}, {what} {args.dtype}, {size:.1f} MiB, chat template {template})")
        lora = f" --lora {args.lora_gguf}" if args.lora_gguf else ""
        print(f"run it: llama-cli -m {args.gguf}{lora} -cnv   |   llama-server -m {args.gguf}{lora}")
    return 0


def main(argv=None) -> int:
    return command_main(ExportArgs, export, argv, __doc__, "minigpt export")


if __name__ == "__main__":
    sys.exit(main())
