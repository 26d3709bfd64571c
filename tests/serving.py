"""Helpers for tests that start `minigpt serve` (or serve.py) as a process on loopback."""
from __future__ import annotations

import socket
import subprocess
import time


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 60.0) -> None:
    """Return once `url`/health answers 200; fail with the server's stderr if the process exits first,
    or when `timeout` seconds pass."""
    import httpx

    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, f"the server did not answer GET /health with 200 within {timeout:g} s"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
