"""Serving throughput: N concurrent streaming clients vs the same requests one at a time.

GPT-2 124M (random weights, GPT-2's init, saved once to a temp folder), served by `minigpt serve`
in its own process on loopback with continuous batching (minigpt.inference.engine); the clients run in this
process, as other programs would. For N = 1, 4, 8 clients and decoding weights fp32 (exact,
repacked) and int8: every client streams one /v1/completions request (a distinct 24-token prompt,
64 new tokens, greedy); all start together. Measured: aggregate new tokens/s over the wall time,
time to first token (p50/p95 over clients), and the same N requests sent one after another
through the same server in the same run (the ratio is concurrent / one-at-a-time tokens/s).
Targets on 2 CPU cores: >= 3x aggregate throughput at 8 clients, p95 time to first token <= 2 s.

    python benchmarks/serve.py            # N = 1, 4, 8; fp32 and int8; 64 tokens each
    python benchmarks/serve.py --quick    # N = 1, 4; fp32; 16 tokens
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, write_json  # noqa: E402

from minigpt import GPT, GPTConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("river stone light winter garden ocean silver morning quiet forest candle harbor meadow thunder "
         "lantern valley").split()


def prompts(n: int, length: int = 24) -> list[str]:
    """Distinct prompts of `length` tokens each (single-token words)."""
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(length)) for i in range(n)]


class Server:
    """`python -m minigpt serve` on a free port, in its own process."""

    def __init__(self, model_dir: str, weights: str, max_batch: int, threads: int):
        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "minigpt", "serve", "--model", model_dir, "--weights", weights,
               "--port", str(self.port), "--max-batch", str(max_batch), "--threads", str(threads),
               "--model-id", "gpt2-random"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.2)

    def close(self):
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)


async def one(client, url: str, prompt: str, max_tokens: int, t0: float) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    first, tokens = None, 0
    async with client.stream("POST", url, json=body, timeout=600) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft_s": first, "tokens": tokens, "end_s": time.perf_counter() - t0}


async def run_clients(port: int, texts: list[str], max_tokens: int, concurrent: bool) -> dict:
    import httpx

    url = f"http://127.0.0.1:{port}/v1/completions"
    async with httpx.AsyncClient() as client:
        t0 = time.perf_counter()
        if concurrent:
            res = await asyncio.gather(*(one(client, url, p, max_tokens, t0) for p in texts))
        else:
            res = []
            for p in texts:
                start = time.perf_counter()
                r = await one(client, url, p, max_tokens, start)
                res.append(r)
        wall = time.perf_counter() - t0
    ttft = sorted(r["ttft_s"] for r in res)
    tokens = sum(r["tokens"] for r in res)
    return {"wall_s": round(wall, 3), "tokens": tokens, "tok_per_s": round(tokens / wall, 1),
            "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_p95_s": round(ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))], 3)}


def bench(model_dir: str, mode: str, clients: list[int], max_tokens: int, threads: int) -> dict:
    srv = Server(model_dir, mode, max(clients), threads)
    try:
        asyncio.run(run_clients(srv.port, prompts(2), 4, True))                  # warm-up
        out = {}
        for n in clients:
            texts = prompts(n)
            together = asyncio.run(run_clients(srv.port, texts, max_tokens, True))
            alone = asyncio.run(run_clients(srv.port, texts, max_tokens, False))
            out[str(n)] = {"concurrent": together, "one_at_a_time": alone,
                           "throughput_ratio": round(together["tok_per_s"] / alone["tok_per_s"], 2)}
            print(f"{mode:>5} N={n}: {together['tok_per_s']:7.1f} tok/s together vs {alone['tok_per_s']:7.1f} "
                  f"one at a time ({out[str(n)]['throughput_ratio']:.2f}x); TTFT p50 {together['ttft_p50_s']:.2f} s "
                  f"p95 {together['ttft_p95_s']:.2f} s", flush=True)
        return out
    finally:
        srv.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 1, 4; fp32 only; 16 tokens")
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    args = ap.parse_args()
    clients, modes, max_tokens = ([1, 4], ["fp32"], 16) if args.quick else ([1, 4, 8], ["fp32", "int8"], 64)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        GPT(GPTConfig.from_name("gpt2")).save_pretrained(tmp)
        results = {mode: bench(tmp, mode, clients, max_tokens, args.threads) for mode in modes}
    top = str(max(clients))
    payload = {"benchmark": "serve", "model": "gpt2 124M, random weights", "prompt_tokens": 24,
               "max_tokens": max_tokens, "greedy": True, "server_threads": args.threads,
               "setup": "minigpt serve in its own process; streaming /v1/completions clients in another",
               "machine": machine_info(),
               "results": results,
               "targets": {f"throughput_ratio_at_{top}": ">= 3.0", "ttft_p95_s": "<= 2.0"},
               "met": {m: {"throughput": r[top]["throughput_ratio"] >= 3.0,
                           "ttft_p95": r[top]["concurrent"]["ttft_p95_s"] <= 2.0} for m, r in results.items()},
               "wall_s": round(time.time() - t0, 1)}
    path = write_json("serve_quick.json" if args.quick else "serve.json", payload)
    print(f"{payload['wall_s']} s; wrote {path}")


if __name__ == "__main__":
    main()
