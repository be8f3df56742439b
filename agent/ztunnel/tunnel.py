"""The node tunnel: outbound (15001) and inbound HBONE (15008).

It reads what the agent keeps in the node's state folder -- the last
snapshot (snapshot.pb) and the workloads' certificates (certs/) -- and
reloads when they change; it has no control-plane credentials of its own.
Captured connections are resolved through the pinned capture map (no
bcc): the original destination, and the source workload from the kernel-
attested cgroup id.

Paths of a captured connection:
- destination on another node: HBONE to that node's tunnel (15008), as
  the source workload, requiring the destination workload's identity;
- destination on this node: policy decided here (as the destination's
  enforcement point), then the kernel splice;
- destination outside the mesh: passthrough (spliced, counted plaintext),
  or refused when the mesh is registry-only.
Inbound: the client's SPIFFE ID is verified, policy decided, the workload
connected from the tunnel's own address (which the ingress guard admits).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import time
from collections import Counter

from .. import heap, log, systemd
from ..bpf import names
from ..bpf.capture import CaptureReader
from ..bpf.sys import Map
from ..node.addresses import (
    node_addresses,
    split_hostport,
)
from . import admin, handoff, hbone, inbound, lb, listeners, tls
from .facts import FactsSender
from .hbone_inbound import HboneInbound
from .metrics import TunnelMetrics
from .outbound import Outbound, _couple, _reset, _tunnel_socket  # noqa: F401 (_couple: tests)
from .plaintext import PlaintextInbound
from .splice import Splicer
from .state import (  # noqa: F401 (re-exported: the CLI and the agent's API)
    HBONE_PORT,
    IP_BIND_ADDRESS_NO_PORT,
    TUNNEL_MARK,
    Snapshot,
    State,
    TunnelConfig,
    _Enforced,
    _model,
)
from .views import Views
from .workers import Workers

_log = log.get("tunnel")


class Tunnel(Snapshot, Outbound, PlaintextInbound, HboneInbound, Views):
    """The node tunnel: its state and lifecycle here; each path in its own module (state.py,
    outbound.py, plaintext.py, hbone_inbound.py, views.py)."""

    def __init__(self, cfg: TunnelConfig):
        self.cfg = cfg
        src = cfg.source or cfg.outbound[0]
        self._source = "" if src == "0.0.0.0" else src  # of connections to local workloads
        self._source6 = cfg.source6 or (cfg.outbound6[0] if cfg.outbound6 else "")
        self.state = State()
        # never a passthrough destination (the kernel refuses them first; see node/addresses.py)
        self.node_addrs = set(node_addresses())
        self.capture = CaptureReader(cfg.maps_dir)
        self.stats = Counter()
        self.splicer = Splicer(self.stats)
        self.pool: hbone.Pool | None = None
        self.identities: tls.ServerIdentities | None = None
        self.lb = lb.Balancer(cfg.lb)
        self.metrics = TunnelMetrics(self)
        self.workers = Workers(self)
        self.facts = FactsSender(cfg.state_dir, self.stats)
        self._stamp = None
        self._listening = False
        self.listener: inbound.Listener | None = None
        # outbound, HBONE, IPv6 outbound (listeners.kinds()): workers inherit them
        self.listen_socks: list[socket.socket] = []
        # tunops.c on our cgroup (the agent attaches it): without it the guard and plain.c
        # cannot tell our connections to local workloads from a host process's, and plain.c
        # would steer each of our deliveries back to our own 15006, again and again
        self._tun_ops = os.path.join(
            os.path.dirname(os.path.normpath(cfg.maps_dir)), "links", names.PROG_TUN_OPS
        )
        self._recognised = os.path.exists(self._tun_ops)
        self.enforced: dict[int, _Enforced] = {}
        self.plain: dict[str, tuple] = {}  # workload key -> (15006 listener, its ip, accept task)
        self.plain_map = Map.pinned(
            os.path.join(cfg.maps_dir, names.MAP_PLAIN)
        )  # flows this tunnel decided, for policy recheck

    # ---- run --------------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        while not self.reload():
            _log.info("waiting for the agent's snapshot", fields={"dir": self.cfg.state_dir})
            await asyncio.sleep(0.5)
        socks, how = listeners.acquire(
            self.cfg.state_dir, self.cfg.outbound, self.cfg.inbound, self.cfg.outbound6
        )
        self.listen_socks = socks
        hb, outbound = socks[1], [socks[0], *socks[2:]]
        listeners.register(self.cfg.maps_dir, socks)
        _log.info(
            f"listeners {how}",
            fields={
                "outbound": [s.getsockname()[:2] for s in outbound],
                "hbone": hb.getsockname(),
            },
        )
        _raise_nofile()
        hbone_in = self.listener = inbound.serve(
            hb,
            self.identities,
            self._inbound,
            handshake_timeout=self.cfg.handshake_timeout,
            vouch=self._vouch,
            revoked=self._is_revoked,
            relayed=self._relayed,
        )
        loop.add_reader(self.splicer.fileno(), self.splicer.process, 0)
        await self.facts.start()
        main = self.cfg.worker == 0
        servers = []
        if main:
            servers.append(
                await admin.serve(
                    self.cfg.inbound[0], self.cfg.readiness_port, {"/healthz/ready": self.ready}
                )
            )
            servers.append(
                await admin.serve(
                    self.cfg.inbound[0], self.cfg.metrics_port, {"/metrics": self.merged_metrics}
                )
            )
        adm = (
            await admin.serve(
                self.cfg.admin[0],
                self.cfg.admin[1],
                {
                    "/config_dump": self.config_dump,
                    "/connections": self.connections,
                    "/flows": self.flows,
                    "/stats": self.stats_doc,
                    "/healthz/ready": self.ready,
                },
            )
            if main
            else None
        )
        self._listening = True
        if main:
            self._sync_plain()
        accepts = [asyncio.ensure_future(self._accept_loop(s)) for s in outbound]
        lender = listeners.Lender(self.cfg.state_dir, socks) if main else None
        receiver = handoff.Receiver(
            handoff.path_in(self.cfg.state_dir, self.cfg.worker),
            self.splicer,
            self.stats,
            self._adopted,
        )
        receiver.start()
        if main:
            await self.workers.start()
        _log.info(
            "tunnel ready",
            fields={
                "outbound": self.cfg.outbound,
                "inbound": self.cfg.inbound,
                "node": self.cfg.node,
            },
        )
        ready = os.path.join(
            self.cfg.state_dir, "tunnel.ready" + (f".{self.cfg.worker}" if not main else "")
        )
        _write_atomic(ready, str(os.getpid()))
        heap.settle()
        trimmer = heap.Trimmer()
        dog = systemd.watchdog_interval() if main else None
        last_dog = 0.0
        if main:
            systemd.notify(
                "READY=1",
                f"STATUS=outbound {self.cfg.outbound[0]}:{self.cfg.outbound[1]}, "
                f"HBONE {self.cfg.inbound[0]}:{self.cfg.inbound[1]}",
            )
        try:
            while not (stop and stop.is_set()):
                if dog is not None and time.monotonic() - last_dog >= dog:
                    systemd.notify("WATCHDOG=1")  # this loop turning is the liveness shown
                    last_dog = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5) if stop else await asyncio.sleep(0.5)
                self.reload()
                self.facts.expire()
                trimmer.maybe()  # what bulk load left free in the C heap goes back
                self._check_recognised()
                self.splicer.process(0)
                if main:
                    await self.workers.tick()
                else:
                    self.workers.report()
        finally:
            # Stop accepting; a successor holds the same listening sockets (it borrowed them)
            # and takes what waits in their queues.
            if main:
                systemd.notify("STOPPING=1")
            if lender is not None:
                lender.close()
            self._listening = False
            for accept in accepts:
                accept.cancel()
            for lsock, _, task in self.plain.values():
                task.cancel()
                lsock.close()  # its map entry goes with it (a successor's replaced it already)
            self.plain.clear()
            for s in outbound:
                s.close()
            hbone_in.close()
            for srv in servers:
                srv.close()
            receiver.close()
            if main:
                self.workers.stop()  # each hands its spliced flows to a successor itself
            with contextlib.suppress(OSError):
                with open(ready) as f:
                    mine = f.read().strip() == str(os.getpid())
                if mine:  # a successor's file is not ours to remove
                    os.unlink(ready)
            handed = handoff.give(
                handoff.path_in(self.cfg.state_dir, self.cfg.worker), self.splicer
            )
            if handed is None and self.cfg.worker:  # no successor of our index: give to its main
                handed = handoff.give(handoff.path_in(self.cfg.state_dir, 0), self.splicer)
            if handed is not None:
                self.stats["handed_off"] += handed
                _log.info("spliced connections handed to the successor", fields={"pairs": handed})
            await self._drain()
            if adm is not None:
                adm.close()
            if main:
                await self.workers.wait(self.cfg.drain + 5)
            loop.remove_reader(self.splicer.fileno())

    async def _drain(self) -> None:
        """Let open flows finish for up to cfg.drain seconds, then close what is left."""
        deadline = time.monotonic() + self.cfg.drain
        left = lambda: self.splicer.active + hbone.TcpSide.open  # noqa: E731
        if left():
            _log.info(
                "draining open flows",
                fields={
                    "splice": self.splicer.active,
                    "relayed": hbone.TcpSide.open,
                    "seconds": self.cfg.drain,
                },
            )
        while left() and time.monotonic() < deadline:
            self.splicer.process(0)
            await asyncio.sleep(0.05)
        if left():
            _log.warning(
                "drain time over; closing open flows",
                fields={"splice": self.splicer.active, "relayed": hbone.TcpSide.open},
            )
        if self.pool:
            for c in list(self.pool.conns.values()):
                if c.transport:
                    c.transport.close()


def _raise_nofile() -> None:
    """Every flow holds descriptors: lift the soft limit to the hard one (10,000s of flows)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want, new_hard in ((1 << 20, 1 << 20), (hard, hard)):  # root may raise the hard limit
        if want == resource.RLIM_INFINITY or soft >= want:
            return
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(new_hard, hard)))
        except (ValueError, OSError):
            continue
        _log.info("open-file limit raised", fields={"from": soft, "to": want})
        return


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def parse_hostport(text: str, version: int = 4) -> tuple[str, int]:
    """IP:PORT (version 4) or [IPv6]:PORT (version 6); ValueError for anything else."""
    host, port = split_hostport(text)
    if ipaddress.ip_address(host).version != version:
        raise ValueError(f"{text!r} is not an IPv{version} address and port")
    return host, port
