"""The tunnel's small HTTP endpoints: readiness (15021) and admin (127.0.0.1:15000).

A minimal HTTP/1.1 responder on asyncio (one request per connection, GET
only): enough for probes, curl and scripts, with no web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import urllib.parse
from collections.abc import Callable

from .. import log

_log = log.get("admin")

Route = Callable[..., object]  # () or (query) -> (status, body: dict/list/str), maybe awaitable


def with_query(fn):
    """Mark a route that takes the request's query parameters (a dict of str -> str)."""
    fn.wants_query = True
    return fn


_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
    400: "Bad Request",
}


def _parse_query(text: str) -> dict[str, str]:
    return {k: v for k, v in urllib.parse.parse_qsl(text, keep_blank_values=True)}


async def serve(
    host: str, port: int, routes: dict[str, Route], unix: str | None = None
) -> asyncio.base_events.Server:
    """Serve routes on host:port, or on the Unix socket path unix (mode 0600: root only)."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        status, body = 400, "bad request\n"
        try:
            line = await asyncio.wait_for(r.readline(), 5)
            parts = line.decode("latin-1").split()
            while await asyncio.wait_for(r.readline(), 5) not in (b"\r\n", b"\n", b""):
                pass
            if len(parts) >= 2:
                method, (path, _, qs) = parts[0], parts[1].partition("?")
                if method != "GET":
                    status, body = 405, "only GET\n"
                elif path in routes:
                    fn = routes[path]
                    res = fn(_parse_query(qs)) if getattr(fn, "wants_query", False) else fn()
                    status, body = (await res) if inspect.isawaitable(res) else res
                else:
                    status, body = 404, {"error": f"no {path}", "paths": sorted(routes)}
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        except Exception as e:  # an endpoint's bug must not take the listener down
            _log.error(f"admin endpoint failed: {e!r}")
            status, body = 503, f"error: {e}\n"
        data = (
            body.encode()
            if isinstance(body, str)
            else (json.dumps(body, indent=1, default=str) + "\n").encode()
        )
        ctype = "text/plain" if isinstance(body, str) else "application/json"
        w.write(
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        try:
            await w.drain()
        except ConnectionError:
            pass
        w.close()

    if unix is None:
        return await asyncio.start_server(handle, host, port, reuse_port=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(unix)
    old = os.umask(0o077)
    try:
        return await asyncio.start_unix_server(handle, unix)
    finally:
        os.umask(old)


async def get_unix(path: str, target: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET target from a server on a Unix socket; (status, body)."""
    r, w = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
    return await _get(r, w, "agent", target, timeout)


async def get(host: str, port: int, target: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET target from a local TCP server (the tunnel's admin, Envoy's); (status, body)."""
    r, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    return await _get(r, w, host, target, timeout)


async def _get(r, w, host: str, target: str, timeout: float) -> tuple[int, bytes]:
    """One request on a new connection, read to its end; a chunked body (Envoy's admin
    streams some) joined."""
    try:
        w.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(r.read(), timeout)
    finally:
        w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[1].isdigit():
        raise ValueError(f"not an HTTP answer: {data[:60]!r}")
    if any(ln.lower().replace(b" ", b"") == b"transfer-encoding:chunked" for ln in lines[1:]):
        out, rest = bytearray(), body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size.split(b";")[0], 16)  # ValueError when it is not a chunk size
            if n == 0:
                break
            out += rest[:n]
            rest = rest[n + 2 :]
        body = bytes(out)
    return int(status[1]), body
