"""What the commands that use a model (chat, serve, export) share: loading it from --model /
--adapter / --quantize, choosing its template, and swapping in the decoding weights --weights asks for."""
from __future__ import annotations

from typing import Optional

from ..data.templates import DEFAULT_TEMPLATE
from .args import CLIError


def load_model(args, device, *, merge: bool = True):
    """(LoadedModel, template) for a command's --model / --adapter (/ --quantize / --revision) flags, loaded on
    `device` (minigpt.training.runs.load_chat_model); the template is --template, else the one the
    model was tuned with, else the default."""
    from ..training.runs import load_chat_model

    loaded = load_chat_model(args.model, args.adapter, device=device, merge=merge,
                             quantize=getattr(args, "quantize", None), revision=getattr(args, "revision", None))
    return loaded, args.template or loaded.template or DEFAULT_TEMPLATE


def decoding_model(args, compile: bool = False):
    """(LoadedModel, template, decoding weights for the banner): load_model on --device, then
    prepare_weights as --weights / --quantize ask."""
    from ..device import resolve_device

    device = resolve_device(args.device)
    loaded, template = load_model(args, device)
    return loaded, template, prepare_weights(loaded.model, args.weights, device, compile, args.quantize)


def prepare_weights(model, weights: str, device, compile: bool, quantize: Optional[str] = None) -> str:
    """Swap in decoding weights (minigpt.inference.decode_weights.prepare_for_decoding) as --weights
    asks; returns what the model decodes with, for the banner. A --quantize base keeps its own layers
    (int8: torch's weight-only int8 kernel; nf4 on CPU: dense fp16 copies of the NF4 numbers)."""
    from ..inference.decode_weights import DECODE_MODES, for_decoding, prepare_for_decoding

    if quantize is not None:
        if weights != "auto":
            raise CLIError("use either --quantize (a quantized base) or --weights (decoding weights), not both")
        return f"{quantize} base: " + (for_decoding(model) if device.type == "cpu" else "as loaded")

    if weights not in ("auto", "plain") + DECODE_MODES:
        raise CLIError(f"--weights must be one of auto, plain, {', '.join(DECODE_MODES)}; got {weights!r}")
    if compile and device.type == "cpu" and weights in ("fp32", "bf16", "w8a8"):
        raise CLIError(f"--compile cannot trace the repacked --weights {weights} on CPU; "
                       f"use fp16, int8, int4 or plain")
    compiled = ", compiled steps" if compile else ""
    if weights == "plain" or (weights == "auto" and (device.type != "cpu" or compile)):
        return "plain" + compiled
    mode = "fp32" if weights == "auto" else weights
    try:
        prepare_for_decoding(model, mode)
    except ValueError as e:
        if weights != "auto":                            # auto: keep the plain weights
            raise CLIError(f"--weights {weights}: {e}") from None
        return "plain"
    return mode + (" (exact, repacked)" if mode == "fp32" else "") + compiled
