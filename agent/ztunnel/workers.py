"""Tunnel workers: more processes on the same listening sockets when one core is not enough.

Worker 0 (the process the agent starts) serves admin, readiness, metrics and
the plaintext listeners, and starts and supervises workers 1..N-1: the same
`dabba tunnel run` with ``--worker i``. Every worker inherits worker 0's
15001 and 15008 sockets (listeners.py: never SO_REUSEPORT, which would let
another process join the port) and accepts from them; each has its own HBONE
pool and splicer over the node's shared pinned maps.

``--workers N`` starts N at once; ``--workers auto`` (0) starts with one and
adds one, up to the number of cores, whenever the busiest tunnel process
used more than 70% of a core over the last 5 s: "when the load asks"
(DABBA_TUNNEL_WORKER_BUSY sets that share).
Workers report their counters to worker 0 through a small JSON file each
second (tunnel-worker.<i>.json), so /stats and /metrics cover them all.
On SIGTERM worker 0 passes it on; each worker hands its spliced flows to
the successor worker of the same index (or the successor's worker 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time

from .. import log
from . import hbone, listeners

_log = log.get("workers")

AUTO_WINDOW = 5.0
AUTO_BUSY = float(os.environ.get("DABBA_TUNNEL_WORKER_BUSY", "0.7"))  # of a core


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process so far, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class Workers:
    def __init__(self, tunnel):
        self.t = tunnel
        self.cfg = tunnel.cfg
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self.stopping = False
        self._last_report = 0.0
        self._window = (time.monotonic(), {})  # (start, pid -> cpu seconds)
        self.max = os.cpu_count() or 1

    def path(self, i: int) -> str:
        return os.path.join(self.cfg.state_dir, f"tunnel-worker.{i}.json")

    # ---- worker 0 ---------------------------------------------------------------------------
    async def start(self) -> None:
        want = self.cfg.workers if self.cfg.workers > 0 else 1
        for i in range(1, want):
            await self._spawn(i)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(self._ready(i) for i in self.procs):
            await asyncio.sleep(0.1)
        for i in self.procs:
            if not self._ready(i):
                _log.error(f"tunnel worker {i} not ready after 30 s")

    def _ready(self, i: int) -> bool:
        p = self.procs.get(i)
        try:
            with open(os.path.join(self.cfg.state_dir, f"tunnel.ready.{i}")) as f:
                return p is not None and int(f.read()) == p.pid
        except (OSError, ValueError):
            return False

    async def _spawn(self, i: int) -> None:
        argv = [sys.executable, "-m", "agent.cli", *self.cfg.argv, "--worker", str(i)]
        fds = [s.fileno() for s in self.t.listen_socks]  # one socket per port, shared
        env = {**os.environ, listeners.ENV: ",".join(map(str, fds))}
        self.procs[i] = await asyncio.create_subprocess_exec(*argv, pass_fds=fds, env=env)
        _log.info("tunnel worker started", fields={"worker": i, "pid": self.procs[i].pid})

    async def tick(self) -> None:
        if self.stopping:
            return
        for i, p in list(self.procs.items()):
            if p.returncode is not None:
                self.restarts += 1
                _log.warning(f"tunnel worker {i} exited with {p.returncode}; restarting")
                await self._spawn(i)
        if self.cfg.workers == 0:
            self._autoscale()

    def _autoscale(self) -> None:
        start, before = self._window
        now = time.monotonic()
        if now - start < AUTO_WINDOW:
            return
        pids = [os.getpid(), *(p.pid for p in self.procs.values())]
        cur = {pid: cpu_seconds(pid) for pid in pids}
        busiest = max(
            (
                (cur[pid] - before[pid]) / (now - start)
                for pid in pids
                if cur[pid] is not None and pid in before
            ),
            default=0.0,
        )
        self._window = (now, {k: v for k, v in cur.items() if v is not None})
        n = 1 + len(self.procs)
        if busiest > AUTO_BUSY and n < self.max:
            _log.info(
                "the load asks for another tunnel worker",
                fields={"busiest_core_share": round(busiest, 2), "workers": n + 1},
            )
            asyncio.ensure_future(self._spawn(n))

    def stop(self) -> None:
        self.stopping = True
        for p in self.procs.values():
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float) -> None:
        for p in self.procs.values():
            try:
                await asyncio.wait_for(p.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()

    def reports(self) -> list[dict]:
        """The other workers' latest counters (worker 0 adds its own)."""
        out = []
        for i, p in self.procs.items():
            try:
                with open(self.path(i)) as f:
                    r = json.load(f)
            except (OSError, ValueError):
                continue
            if r.get("pid") == p.pid:
                out.append(r)
        return out

    # ---- workers 1..N-1 ----------------------------------------------------------------------
    def report(self) -> None:
        now = time.monotonic()
        if now - self._last_report < 1.0:
            return
        self._last_report = now
        t = self.t
        doc = {
            "worker": self.cfg.worker,
            "pid": os.getpid(),
            "stats": dict(t.stats),
            "splice_pairs": t.splicer.active,
            "relayed_sides": hbone.TcpSide.open,
            "refused": dict(t.listener.refused) if t.listener else {},
            "opened": [[list(k), v] for k, v in t.metrics.opened.items()],
            "closed": [[list(k), v] for k, v in t.metrics.closed.items()],
        }
        tmp = self.path(self.cfg.worker) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self.path(self.cfg.worker))
