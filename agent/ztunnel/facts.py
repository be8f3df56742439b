"""What the tunnel knows of a flow, sent to the agent, which joins it with the kernel's record.

The kernel accounts every flow of an enrolled workload (bytes, segments,
RTT, close) on the workload's own socket; only the tunnel knows the peer's
identity, the service, the path and the policy verdict. For each workload
socket it handles, the tunnel sends one JSON line to the agent's
``flowfacts.sock``, keyed by that socket's addresses as the kernel records
them (the workload's end first).

Sending never blocks a flow: lines go through one Unix stream connection
per tunnel process. The facts of open flows (and of those closed in the last
``GRACE`` seconds) are kept, and sent again whenever the line to the agent is
made again: a restarted agent (``systemctl restart dabba-agent``) learns the
identities of the flows that stayed open through its restart, however many
short flows came and went meanwhile. Facts sent while the agent is away are
counted as ``facts_deferred``; more than 4 MiB waiting on the line drops
facts (``facts_dropped``), and those flows show up in ``dabba flows``
without them (path ``pending``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import time

from .. import log

_log = log.get("facts")

SOCKET = "flowfacts.sock"
MAX_BUFFERED = 4 << 20
# s between tries to reach a (re)starting agent: well inside the agent's wait for late facts
# (flowtable.FACTS_WAIT), so the flows that close just after its restart still get theirs
RETRY = 0.2


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
    """One tunnel process's line to the agent, made again whenever it breaks."""

    LIVE_MAX = 1 << 16  # facts of open flows kept for replay (more: the oldest go, counted)
    GRACE = 2.0  # s a closed flow's fact is still replayed (its record may not be drained yet)
    RECENT_MAX = 4096  # closed flows' facts kept at most

    def __init__(self, state_dir: str, stats):
        self.path = os.path.join(state_dir, SOCKET)
        self.stats = stats
        self.writer: asyncio.StreamWriter | None = None
        # replayed to a new agent line: the facts of open flows, then of those closed in the last
        # GRACE seconds. Before, the last 16,384 facts, whatever their flows: under churn a
        # long-lived flow's fact went within seconds, and a restarted agent no longer knew it
        self.kept: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.recent: collections.OrderedDict[str, tuple[float, bytes]] = collections.OrderedDict()
        self._task: asyncio.Task | None = None

    def send(self, key: str, side: str, src: dict, dst: dict, live: bool = True, **fields) -> None:
        """side: "source" when the workload socket is the flow's client, else "destination".
        live: the flow goes on (closed(key) when it ends); False: it ends here (refused)."""
        doc = {"key": key, "t": time.time(), "side": side, "src": src, "dst": dst, **fields}
        line = (json.dumps(doc, separators=(",", ":")) + "\n").encode()
        if live:
            self.kept[key] = line
            self.kept.move_to_end(key)
            if len(self.kept) > self.LIVE_MAX:
                self.kept.popitem(last=False)
                self.stats["facts_unkept"] += 1
        else:
            self.kept.pop(key, None)  # this socket's flow ends here, whatever was said before
            self._recent(key, line)
        w = self.writer
        if w is None or w.is_closing():
            self.stats["facts_deferred"] += 1  # sent when the line is back
            return
        if w.transport.get_write_buffer_size() > MAX_BUFFERED:
            self.stats["facts_dropped"] += 1
            return
        w.write(line)
        self.stats["facts_sent"] += 1

    def closed(self, *keys: str | None) -> None:
        """These flows ended: their facts are replayed only GRACE seconds more."""
        for key in keys:
            line = self.kept.pop(key, None) if key else None
            if line is not None:
                self._recent(key, line)

    def _recent(self, key: str, line: bytes) -> None:
        now = time.monotonic()
        self.recent[key] = (now, line)
        self.recent.move_to_end(key)
        self._prune(now)

    def _prune(self, now: float) -> None:
        while self.recent and (
            len(self.recent) > self.RECENT_MAX
            or next(iter(self.recent.values()))[0] < now - self.GRACE
        ):
            self.recent.popitem(last=False)

    def expire(self) -> None:
        """Forget closed flows' facts older than GRACE, from the tunnel's loop twice a second:
        pruned only on a close, a burst's last facts (up to RECENT_MAX, ~3 MiB after 2,000
        connections/s) stayed until the next flow closed."""
        self._prune(time.monotonic())
        # an emptied dict keeps the table its peak needed; a new one is small again
        if not self.recent:
            self.recent = collections.OrderedDict()
        if not self.kept:
            self.kept = collections.OrderedDict()

    def replay(self) -> list[bytes]:
        now = time.monotonic()
        return [
            *self.kept.values(),
            *(ln for t, ln in self.recent.values() if t >= now - self.GRACE),
        ]

    async def _keep_connected(self) -> None:
        announced = False
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path)
            except OSError as e:
                if announced:
                    _log.debug(f"agent's {self.path} unavailable: {e}")
                await asyncio.sleep(RETRY)
                continue
            lines = self.replay()
            if lines:
                writer.write(b"".join(lines))
                self.stats["facts_replayed"] += len(lines)
            self.writer = writer
            _log.info(
                "sending flow facts to the agent",
                fields={"socket": self.path, "replayed": len(lines)},
            )
            announced = True
            try:
                while await reader.read(4096):  # the agent never writes: this waits for EOF
                    pass
            except OSError:
                pass
            self.writer = None
            writer.close()
            _log.info("the agent closed the flow-facts line; making it again")
            await asyncio.sleep(0.2)

    async def start(self) -> None:
        """Connect now if the agent is there (so the first flows' facts are not deferred)."""
        self._task = asyncio.ensure_future(self._keep_connected())
        for _ in range(20):
            if self.writer is not None:
                return
            await asyncio.sleep(0.01)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.writer is not None:
            self.writer.close()
