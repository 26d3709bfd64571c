"""Serve a model over an OpenAI-compatible HTTP API, with a browser chat page at /. With no
arguments it serves the model `minigpt chat` would pick (newest out-finetune/, else out/) on
http://127.0.0.1:8000.

examples:
  minigpt serve                                      # newest local run, http://127.0.0.1:8000
  minigpt serve --model out-finetune --weights int8  # faster CPU decoding
  minigpt serve --host 0.0.0.0 --api-key KEY         # reachable from other machines, with a key
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Name three colors."}]}'
(`python serve.py ...` is the same command; needs pip install -e ".[serve]".)
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..data.templates import TEMPLATE_NAMES
from ..model.quant import QUANT_MODES
from .args import CLIError, check, command_main, field


@dataclass
class ServeArgs:
    model: Optional[str] = field(None, "any GPT.from_pretrained source or a finetune output dir (default: "
                                       "newest out-finetune/, else out/)")
    adapter: Optional[str] = field(None, "adapter dir of any fine-tuning method (minigpt's or PEFT's)")
    template: Optional[str] = field(None, "prompt template (default: the one the model was tuned with, "
                                          "else alpaca)", choices=TEMPLATE_NAMES)
    weights: str = field("auto", "decoding weights, as in minigpt chat: auto, fp16, bf16, int8, w8a8, int4, plain")
    quantize: Optional[str] = field(None, "load the base quantized: nf4 or int8 (as in minigpt chat)",
                                    choices=QUANT_MODES)
    device: str = field("auto", "auto, cpu, cuda or cuda:N")
    host: str = field("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = field(8000, "TCP port")
    api_key: Optional[str] = field(None, "require 'Authorization: Bearer KEY' on /v1 (default: the "
                                         "MINIGPT_API_KEY environment variable, else no key)")
    model_id: Optional[str] = field(None, "the name /v1/models reports (default: the model folder's name)")
    max_batch: int = field(8, "requests decoded together (continuous batching)")
    max_waiting: int = field(64, "requests that may wait for a free slot before 429s")
    threads: Optional[int] = field(None, "CPU threads for torch (default: all cores)", metavar="N")
    debug: bool = field(False, "show tracebacks")

    def __post_init__(self) -> None:
        check(0 < self.port < 65536, "port", "in 1..65535", self.port)
        check(self.max_batch >= 1, "max_batch", ">= 1", self.max_batch)
        check(self.max_waiting >= 0, "max_waiting", ">= 0", self.max_waiting)
        check(self.threads is None or self.threads >= 1, "threads", "a positive integer", self.threads)
        if self.api_key is None:
            self.api_key = os.environ.get("MINIGPT_API_KEY") or None


def _server_modules():
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise CLIError('the server needs the serve extra: pip install -e ".[serve]" (starlette and uvicorn)') from None
    return uvicorn


def serve(args: ServeArgs) -> int:
    """The body of `minigpt serve`: load the model, start the engine, run the HTTP server."""
    import torch

    from ..data.tokenizer import get_tokenizer
    from ..inference.engine import Engine
    from ..inference.serve import create_app
    from .common import decoding_model

    uvicorn = _server_modules()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded, template, weights = decoding_model(args)
    model_id = args.model_id or Path(loaded.adapter or loaded.source).name or "minigpt"
    engine = Engine(loaded.model, get_tokenizer(), max_batch=args.max_batch, max_waiting=args.max_waiting).start()
    app = create_app(engine, model_id, template=template, api_key=args.api_key)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {loaded.source} as {model_id!r} (template {template}, weights {weights}, batch up to "
          f"{args.max_batch}) on http://{host}:{args.port}  (chat page at /, API at /v1"
          f"{', API key required' if args.api_key else ''}; Ctrl-C stops)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
    return 0


def main(argv=None) -> int:
    return command_main(ServeArgs, serve, argv, __doc__, "minigpt serve")


if __name__ == "__main__":
    sys.exit(main())
