"""What the tunnel knows of a flow, sent to the agent, which joins it with the kernel's record.

The kernel accounts every flow of an enrolled workload (bytes, segments,
RTT, close) on the workload's own socket; only the tunnel knows the peer's
identity, the service, the path and the policy verdict. For each workload
socket it handles, the tunnel sends one JSON line to the agent's
``flowfacts.sock``, keyed by that socket's addresses as the kernel records
them (the workload's end first).

Sending never blocks a flow: lines go through one Unix stream connection
per tunnel process; while the agent is away, or when more than 4 MiB wait,
facts are dropped and counted (``facts_dropped``), and the flows show up
in ``dabba flows`` without them (path ``pending``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from .. import log

_log = log.get("facts")

SOCKET = "flowfacts.sock"
MAX_BUFFERED = 4 << 20


def key_of(workload_end: tuple, other_end: tuple) -> str:
    """The join key: the workload socket's (local, remote) addresses, as the kernel records them."""
    return f"{workload_end[0]}:{workload_end[1]}>{other_end[0]}:{other_end[1]}"


def party(w, ip: str | None = None, port: int | None = None, identity: str | None = None) -> dict:
    """One end of a flow; w is a control-plane Workload or None (outside the mesh)."""
    return {
        "ip": ip if ip is not None else (w.ip if w is not None else ""),
        "port": port,
        "workload": f"{w.namespace}/{w.name}" if w is not None else "",
        "identity": identity if identity is not None else (w.spiffe_id if w is not None else ""),
    }


class FactsSender:
    """One tunnel process's line to the agent."""

    def __init__(self, state_dir: str, stats):
        self.path = os.path.join(state_dir, SOCKET)
        self.stats = stats
        self.writer: asyncio.StreamWriter | None = None
        self._connecting = False
        self._next_try = 0.0

    def send(self, key: str, side: str, src: dict, dst: dict, **fields) -> None:
        """side: "source" when the workload socket is the flow's client, else "destination"."""
        w = self.writer
        if w is None or w.is_closing():
            self._reconnect()
            self.stats["facts_dropped"] += 1
            return
        if w.transport.get_write_buffer_size() > MAX_BUFFERED:
            self.stats["facts_dropped"] += 1
            return
        doc = {"key": key, "t": time.time(), "side": side, "src": src, "dst": dst, **fields}
        w.write((json.dumps(doc, separators=(",", ":")) + "\n").encode())
        self.stats["facts_sent"] += 1

    def _reconnect(self) -> None:
        now = time.monotonic()
        if self._connecting or now < self._next_try:
            return
        self._connecting, self._next_try = True, now + 1.0
        asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        try:
            _, self.writer = await asyncio.open_unix_connection(self.path)
            _log.info("sending flow facts to the agent", fields={"socket": self.path})
        except OSError as e:
            _log.debug(f"agent's {self.path} unavailable: {e}")
        finally:
            self._connecting = False

    async def start(self) -> None:
        await self._connect()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
