"""Serve a model over an OpenAI-compatible HTTP API, with a browser chat page at /. With no
arguments it serves the model `minigpt chat` would pick (newest out-finetune/, else out/) on
http://127.0.0.1:8000.

examples:
  minigpt serve                                      # newest local run, http://127.0.0.1:8000
  minigpt serve --model out-finetune --weights int8  # faster CPU decoding
  minigpt serve --host 0.0.0.0 --api-key-file key    # reachable from other machines, with a key
  minigpt serve --allow-origin http://localhost:3000 # let that web app call the API (CORS)
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Name three colors."}]}'
(`python serve.py ...` is the same command; needs pip install -e ".[serve]".)

Security: on a loopback address (the default) only this machine can connect, and requests must name
it as localhost or an IP address (DNS-rebinding protection). Anywhere, a request a web page sends
(it carries Origin) must come from the chat page's own origin or one given with --allow-origin, so
other sites you visit cannot use the server. On other addresses use a key: --api-key-file or the
MINIGPT_API_KEY environment variable keep it out of the process list.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..data.templates import TEMPLATE_NAMES
from ..inference.http_guard import REQUEST_TIMEOUT, OriginPolicy
from ..model.quant import QUANT_MODES
from .args import CLIError, check, command_main, field


@dataclass
class ServeArgs:
    model: Optional[str] = field(None, "any GPT.from_pretrained source (e.g. a Hub name ORG/NAME) or a finetune "
                                       "output dir (default: newest out-finetune/, else out/)")
    revision: Optional[str] = field(None, "Hub revision of a --model ORG/NAME (or of the adapter's Hub base): "
                                          "a branch, tag or commit sha (default: main)", metavar="REV")
    adapter: Optional[str] = field(None, "adapter dir of any fine-tuning method (minigpt's or PEFT's)")
    template: Optional[str] = field(None, "prompt template (default: the one the model was tuned with, "
                                          "else alpaca)", choices=TEMPLATE_NAMES)
    weights: str = field("auto", "decoding weights, as in minigpt chat: auto, fp16, bf16, int8, w8a8, int4, plain")
    quantize: Optional[str] = field(None, "load the base quantized: nf4 or int8 (as in minigpt chat)",
                                    choices=QUANT_MODES)
    device: str = field("auto", "auto, cpu, cuda or cuda:N")
    host: str = field("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = field(8000, "TCP port")
    api_key: Optional[str] = field(None, "require 'Authorization: Bearer KEY' on /v1; other users can see it in "
                                         "the process list, so prefer --api-key-file or MINIGPT_API_KEY "
                                         "(default: the MINIGPT_API_KEY environment variable, else no key)")
    api_key_file: Optional[str] = field(None, "read the API key from this file (surrounding whitespace ignored)",
                                        metavar="PATH")
    allow_origin: list[str] = field([], "let web pages from this origin call the server, with CORS headers "
                                        "(e.g. http://localhost:3000; * = any page, null = file:// pages)",
                                    metavar="URL")
    allow_host: list[str] = field([], "on a loopback address, also answer requests whose Host is this name "
                                      "(e.g. behind a reverse proxy)", metavar="NAME")
    request_timeout: float = field(REQUEST_TIMEOUT, "seconds a client has to send a whole request (head and "
                                                    "body); after that: 408 and the connection is closed",
                                   metavar="S")
    max_connections: Optional[int] = field(None, "open connections served at once; requests over it get 503 "
                                                 "(default: --max-batch + --max-waiting + 64)", metavar="N")
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
        check(math.isfinite(self.request_timeout) and self.request_timeout > 0, "request_timeout",
              "a positive number of seconds", self.request_timeout)
        check(self.max_connections is None or self.max_connections >= 1, "max_connections", ">= 1",
              self.max_connections)
        if self.max_connections is None:
            self.max_connections = self.max_batch + self.max_waiting + 64
        OriginPolicy(self.allow_origin)                    # a malformed origin: one line now
        self.api_key = _api_key(self.api_key, self.api_key_file)


def _api_key(flag: Optional[str], path: Optional[str]) -> Optional[str]:
    """The key from --api-key, else --api-key-file, else MINIGPT_API_KEY; None when none is given.
    An empty or unusable key is an error (never silently no authentication)."""
    if flag is not None and path is not None:
        raise CLIError("give the key with --api-key or with --api-key-file, not both")
    if path is not None:
        try:
            key, where = Path(path).expanduser().read_text(encoding="utf-8").strip(), f"--api-key-file {path}"
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"--api-key-file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    elif flag is not None:
        key, where = flag, "--api-key"
    elif "MINIGPT_API_KEY" in os.environ:
        key, where = os.environ["MINIGPT_API_KEY"], "the MINIGPT_API_KEY environment variable"
    else:
        return None
    if not key.strip():
        raise CLIError(f"{where} is set but empty: set a key, or unset it to serve without one"
                       if where.startswith("the") else f"{where} is empty: give a key, or leave it out to serve "
                                                       "without one")
    if key != key.strip() or not (key.isascii() and key.isprintable()):
        raise CLIError(f"{where}: the key must be printable ASCII without surrounding spaces (it travels in an "
                       "HTTP header)")
    return key


def _server_modules():
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise CLIError('the server needs the serve extra: pip install -e ".[serve]" (starlette and uvicorn)') from None
    return uvicorn


def serve(args: ServeArgs) -> int:
    """The body of `minigpt serve`: bind the port, load the model, start the engine, run the HTTP server."""
    from ..inference.http_guard import bind_sockets

    uvicorn = _server_modules()
    _check_model_exists(args)
    sockets, loopback = bind_sockets(args.host, args.port)  # a taken port or bad host: before the model loads
    try:
        return _serve_on(args, uvicorn, sockets, loopback)
    finally:
        for s in sockets:
            s.close()


def _check_model_exists(args: ServeArgs) -> None:
    """No --model and no local run: say how to get one before binding the port (as chat does)."""
    from ..errors import ChatError
    from ..training.runs import NO_MODEL_MESSAGE, find_latest_run

    if args.model is None and args.adapter is None and find_latest_run() is None:
        raise ChatError(NO_MODEL_MESSAGE)


def _serve_on(args: ServeArgs, uvicorn, sockets: list, loopback: bool) -> int:
    import torch

    from ..data.tokenizer import get_tokenizer
    from ..device import resolve_device
    from ..inference.engine import Engine
    from ..inference.http_guard import server_config
    from ..inference.scoring import Scorer
    from ..inference.serve import create_app
    from .common import load_model, prepare_weights

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    loaded, template = load_model(args, device)
    scorer = Scorer(loaded.model)           # echoed prompts: scored by the fp32 model, whatever decodes below
    weights = prepare_weights(loaded.model, args.weights, device, False, args.quantize)
    if weights.startswith(("plain", "fp32")):   # the decoding layers compute fp32 themselves: no second copy
        scorer = Scorer(loaded.model)
    model_id = args.model_id or Path(loaded.adapter or loaded.source).name or "minigpt"
    engine = Engine(loaded.model, get_tokenizer(), max_batch=args.max_batch, max_waiting=args.max_waiting).start()
    app = create_app(engine, model_id, template=template, api_key=args.api_key, loopback=loopback,
                     allow_origins=args.allow_origin, allow_hosts=args.allow_host, scorer=scorer)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {loaded.source} as {model_id!r} (template {template}, weights {weights}, batch up to "
          f"{args.max_batch}) on http://{host}:{args.port}  (chat page at /, API at /v1"
          f"{', API key required' if args.api_key else ''}; Ctrl-C stops)", flush=True)
    if not loopback and not args.api_key:
        print(f"warning: {args.host} is reachable from other machines and no API key is set: anyone who can "
              f"reach port {args.port} can use the model (set MINIGPT_API_KEY or --api-key-file)",
              file=sys.stderr, flush=True)
    server = uvicorn.Server(server_config(app, request_timeout=args.request_timeout,
                                          max_connections=args.max_connections))
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:                      # uvicorn re-raises the Ctrl-C it handled
        pass
    finally:
        engine.stop()
    return 0


def main(argv=None) -> int:
    return command_main(ServeArgs, serve, argv, __doc__, "minigpt serve")


if __name__ == "__main__":
    sys.exit(main())
