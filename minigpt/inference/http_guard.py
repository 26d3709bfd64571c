"""What stands between the network and the server's routes (minigpt.inference.serve).

- HostOriginGuard (ASGI middleware): DNS-rebinding protection (on a loopback bind, the Host header must
  be localhost, *.localhost, an IP address or a name in allow_hosts) and cross-origin protection (a
  request that a web page sends carries Origin: it must be the server's own origin or one in
  allow_origins; allowed foreign origins get CORS headers and preflight answers). Refusals are 403s
  with an OpenAI-shaped JSON error. Programs that send no Origin (curl, SDKs) are not affected.
- guarded_protocol: uvicorn's h11 protocol with a deadline for receiving each request, head and body
  (slowloris): past it a half-sent request gets 408 and the connection is closed.
- bind_sockets: the listening sockets, bound before the model loads so that a taken port or a bad
  host is a one-line error; server_config: the uvicorn.Config that serves them with the guard.

Imports neither Starlette nor uvicorn at module level (they are the optional [serve] extra).
"""
from __future__ import annotations

import errno
import ipaddress
import json
import re
import socket
from typing import Iterable, Optional, Sequence
from urllib.parse import urlsplit

from ..errors import ConfigError

__all__ = ["HostOriginGuard", "OriginPolicy", "guarded_protocol", "bind_sockets", "server_config",
           "REQUEST_TIMEOUT"]

REQUEST_TIMEOUT = 30.0          # seconds to receive a whole request (head and body)
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#@\s]+")
_TOKENS = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~, -]*")
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"


# --- origins and hosts --------------------------------------------------------------------------

def _origin_key(origin: str) -> Optional[tuple[str, str, int]]:
    """(scheme, host, port) of a serialized origin such as http://localhost:3000, else None."""
    origin = origin.strip().lower().rstrip("/")
    if not _ORIGIN.fullmatch(origin):
        return None
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.scheme, parts.hostname.rstrip("."), port if port is not None else DEFAULT_PORTS.get(parts.scheme, 0)


def _split_host(host: str) -> tuple[str, Optional[int]]:
    """(name, port) of a Host header; name lowercased, IPv6 brackets removed; port -1 when unreadable."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
    else:
        name, port = host, None
    if port is None:
        return name.rstrip("."), None
    return name.rstrip("."), int(port) if port.isdigit() else -1


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class OriginPolicy:
    """The web origins allowed besides the server's own: exact origins, "null", or "*" (any)."""

    def __init__(self, allow_origins: Iterable[str] = ()):
        self.any = self.null = False
        self.exact: set[tuple[str, str, int]] = set()
        for o in allow_origins:
            if o.strip() == "*":
                self.any = True
            elif o.strip().lower() == "null":
                self.null = True
            elif (key := _origin_key(o)) is not None:
                self.exact.add(key)
            else:
                raise ConfigError(f"--allow-origin must be an origin such as http://localhost:3000 (scheme://host"
                                  f"[:port], no path), null or *; got {o!r}")

    def allows(self, origin: str) -> bool:
        if self.any:
            return True
        if origin.strip().lower() == "null":
            return self.null
        return _origin_key(origin) in self.exact


def same_origin(origin: str, host: str) -> bool:
    """Whether Origin names the server the request was sent to (the Host header)."""
    key = _origin_key(origin)
    if key is None:
        return False
    name, port = _split_host(host)
    return key[1] == name and key[2] == (port if port is not None else DEFAULT_PORTS.get(key[0], 0))


def local_host(host: str, allow_hosts: set[str]) -> bool:
    """Whether a Host header may reach a loopback-bound server: an IP address (a DNS-rebinding page
    always sends its own domain name), localhost, *.localhost, or a name in allow_hosts."""
    name, port = _split_host(host)
    if port == -1:
        return False
    return not name or _is_ip(name) or name == "localhost" or name.endswith(".localhost") or name in allow_hosts


# --- the middleware -----------------------------------------------------------------------------

def _error_body(message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()


async def _respond(send, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
    if body:
        headers = headers + [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class HostOriginGuard:
    """ASGI middleware: 403 for a foreign Host on a loopback bind (DNS rebinding) and for an Origin
    that is neither the server's own nor allowed; CORS headers and preflight answers for allowed ones."""

    def __init__(self, app, *, loopback: bool = True, allow_origins: Sequence[str] = (),
                 allow_hosts: Sequence[str] = ()):
        self.app, self.loopback = app, loopback
        self.origins = allow_origins if isinstance(allow_origins, OriginPolicy) else OriginPolicy(allow_origins)
        self.hosts = {h.strip().lower().rstrip(".") for h in allow_hosts}

    def refusal(self, hosts: list[str], origins: list[str]) -> Optional[tuple[str, str]]:
        """(message, code) when the request must be refused, else None."""
        if len(hosts) > 1 or len(origins) > 1:
            return "a request may carry one Host and one Origin header", "bad_headers"
        host, origin = (hosts or [""])[0], (origins or [None])[0]
        if self.loopback and not local_host(host, self.hosts):
            return (f"Host {host!r} refused: this server listens on loopback and answers to localhost or an IP "
                    "address only (DNS-rebinding protection; minigpt serve --allow-host NAME allows a name)",
                    "host_not_allowed")
        if origin is not None and not same_origin(origin, host) and not self.origins.allows(origin):
            return (f"requests from web pages at {origin} are refused (cross-origin protection; minigpt serve "
                    f"--allow-origin {origin} allows them)", "origin_not_allowed")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        hosts, origins, fields = [], [], {}
        for k, v in scope["headers"]:
            name, value = k.decode("latin-1").lower(), v.decode("latin-1")
            (hosts if name == "host" else origins if name == "origin" else fields.setdefault(name, [])).append(value)
        refused = self.refusal(hosts, origins)
        if refused is not None:
            return await _respond(send, 403, [], _error_body(*refused))
        origin = origins[0] if origins else None
        if origin is None:
            return await self.app(scope, receive, send)
        if scope["method"] == "OPTIONS" and "access-control-request-method" in fields:
            return await _respond(send, 204, self._preflight(origin, fields))
        if same_origin(origin, hosts[0] if hosts else ""):
            return await self.app(scope, receive, send)
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)
        await self.app(scope, receive, send_with_cors)

    @staticmethod
    def _preflight(origin: str, fields: dict) -> list[tuple[bytes, bytes]]:
        asked = ", ".join(fields.get("access-control-request-headers", []))
        headers = [(b"access-control-allow-origin", origin.encode("latin-1")),
                   (b"access-control-allow-methods", CORS_METHODS.encode()),
                   (b"access-control-allow-headers", (asked if asked and _TOKENS.fullmatch(asked)
                                                      else CORS_HEADERS).encode()),
                   (b"access-control-max-age", b"600"),
                   (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers")]
        if fields.get("access-control-request-private-network") == ["true"]:   # Chrome's Private Network Access
            headers.append((b"access-control-allow-private-network", b"true"))
        return headers


# --- the connection: request deadline and connection limit ----------------------------------------

_408 = _error_body("the request was not received in time; the connection is closed", "request_timeout")
_408_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                 b"content-length: " + str(len(_408)).encode() + b"\r\n\r\n" + _408)


def guarded_protocol(request_timeout: float = REQUEST_TIMEOUT) -> type:
    """uvicorn's h11 protocol class with a deadline: each request (head and body) must arrive within
    `request_timeout` seconds of the connection opening or of its first byte; else 408 and close."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    reading = (h11.IDLE, h11.SEND_BODY)

    class GuardedH11Protocol(H11Protocol):
        timeout = request_timeout
        _deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def connection_lost(self, exc) -> None:
            self._stop()
            super().connection_lost(exc)

        def _watch(self) -> None:
            """Start the clock when a request starts arriving, stop it once it has arrived."""
            if self.conn.their_state in reading and not self.transport.is_closing():
                if self._deadline is None:
                    self._deadline = self.loop.call_later(self.timeout, self._expired)
            else:
                self._stop()

        def _stop(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.conn.their_state not in reading:
                return
            if self.conn.their_state is h11.SEND_BODY:
                answer = self.cycle is None or not self.cycle.response_started
            else:                                         # IDLE: a head begun, or nothing sent at all
                answer = bool(self.conn.trailing_data[0])
            if answer:
                self.transport.write(_408_RESPONSE)
            self.logger.info("request not received within %gs; connection closed", self.timeout)
            self.transport.close()

    return GuardedH11Protocol


def server_config(app, *, request_timeout: float = REQUEST_TIMEOUT, max_connections: Optional[int] = None,
                  log_level: str = "warning"):
    """The uvicorn.Config serving `app` with the request deadline; above `max_connections` open
    connections new requests get 503 (uvicorn's limit_concurrency)."""
    import uvicorn

    return uvicorn.Config(app, http=guarded_protocol(request_timeout), ws="none", limit_concurrency=max_connections,
                          log_level=log_level)


# --- the listening sockets ----------------------------------------------------------------------

def _bind_error(host: str, port: int, e: OSError) -> ConfigError:
    if e.errno == errno.EADDRINUSE:
        return ConfigError(f"port {port} is already in use on {host} (another server running? choose another "
                           "with --port)")
    if e.errno == errno.EACCES:
        return ConfigError(f"no permission to listen on port {port} (ports below 1024 need privileges; choose "
                           "another with --port)")
    if e.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"--host {host} is not an address of this machine")
    return ConfigError(f"cannot listen on {host} port {port}: {e.strerror or e}")


def bind_sockets(host: str, port: int, backlog: int = 2048) -> tuple[list[socket.socket], bool]:
    """Listening TCP sockets for every address `host` resolves to, and whether all are loopback.
    A name that does not resolve, a taken port or a foreign address raise ConfigError (one line)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else "not a valid host name"
        raise ConfigError(f"--host {host!r} is neither an IP address nor a host name this machine can resolve "
                          f"({why})") from None
    socks: list[socket.socket] = []
    missing: Optional[OSError] = None           # an address this machine lacks (e.g. ::1 without IPv6)
    for family, kind, proto, _, addr in dict.fromkeys((i[0], i[1], i[2], i[3], i[4]) for i in infos):
        try:
            s = socket.socket(family, kind, proto)
        except OSError as e:
            missing = e
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(addr)
            s.listen(backlog)
            socks.append(s)
        except OSError as e:
            s.close()
            if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                missing = e
                continue
            for t in socks:
                t.close()
            raise _bind_error(host, port, e) from None
    if not socks:
        raise _bind_error(host, port, missing or OSError(errno.EADDRNOTAVAIL, "no address"))
    loopback = all(ipaddress.ip_address(s.getsockname()[0].split("%")[0]).is_loopback for s in socks)
    return socks, loopback
