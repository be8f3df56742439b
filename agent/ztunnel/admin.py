"""The tunnel's small HTTP endpoints: readiness (15021) and admin (127.0.0.1:15000).

A minimal HTTP/1.1 responder on asyncio (one request per connection, GET
only): enough for probes, curl and scripts, with no web framework.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from .. import log

_log = log.get("admin")

Route = Callable[[], tuple[int, object]]  # -> (status, body: dict/list/str)
_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
    400: "Bad Request",
}


async def serve(host: str, port: int, routes: dict[str, Route]) -> asyncio.base_events.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        status, body = 400, "bad request\n"
        try:
            line = await asyncio.wait_for(r.readline(), 5)
            parts = line.decode("latin-1").split()
            while await asyncio.wait_for(r.readline(), 5) not in (b"\r\n", b"\n", b""):
                pass
            if len(parts) >= 2:
                method, path = parts[0], parts[1].split("?", 1)[0]
                if method != "GET":
                    status, body = 405, "only GET\n"
                elif path in routes:
                    status, body = routes[path]()
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

    return await asyncio.start_server(handle, host, port, reuse_port=True)
