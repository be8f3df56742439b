"""Plaintext inbound (15006): the tunnel's listener inside each PERMISSIVE or DISABLE workload's
network namespace, where the kernel steers plaintext connections (plain.c); the tunnel decides
policy on them and delivers them from its own address."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import socket

from .. import log
from ..bpf import abi
from ..control import wire
from ..control.model import mtls_mode, plaintext_ports
from ..netns import entered
from ..node.addresses import (
    unmapped,
)
from .facts import party
from .metrics import istio_labels
from .outbound import _Closer, _reset
from .state import _facts

_log = log.get("tunnel")


class PlaintextInbound:
    """Tunnel's part: 15006 in each plaintext workload's namespace."""

    def _sync_plain(self) -> None:
        """One 15006 listener in each PERMISSIVE/DISABLE local workload's network namespace.

        plain.c (attached by the agent) steers plaintext connections for the
        workload's address to it; its accepted sockets keep the original
        destination. Listeners of workloads gone or now STRICT are closed.
        """
        want = {
            f"{w.namespace}/{w.name}": w
            for w in self.state.by_cgroup.values()
            if w.netns and plaintext_ports(w)
        }
        for key in list(self.plain):
            if key not in want or self.plain[key][1] != _plain_ips(want[key]):
                ls, ips, task = self.plain.pop(key)
                task.cancel()
                for ip in ips:
                    with contextlib.suppress(OSError):
                        self.plain_map.delete(abi.ip6(ip))
                ls.close()
        for key, w in want.items():
            if key in self.plain:
                continue
            ips = _plain_ips(w)
            try:
                # one dual-stack socket for both of the workload's addresses (plain.c assigns it
                # to IPv4 and IPv6 connections alike)
                ls = _listener_in_netns(w.netns, self.cfg.plain_port)
                for ip in ips:
                    self.plain_map.update(abi.ip6(ip), ctypes.c_uint32(ls.fileno()))
            except OSError as e:
                _log.error(f"no plaintext listener for {key} in {w.netns}: {e}")
                continue
            task = asyncio.ensure_future(self._plain_accept(ls, key))
            self.plain[key] = (ls, ips, task)
            _log.info("plaintext listener ready", fields={"workload": key, "netns": w.netns})

    async def _plain_accept(self, ls: socket.socket, key: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(ls)
            asyncio.ensure_future(self._plain_inbound(sock, key))

    async def _plain_inbound(self, sock: socket.socket, key: str) -> None:
        """A plaintext peer outside the mesh: policy without identity, then the kernel splice."""
        try:
            dst_ip, port = sock.getsockname()[:2]
            src_ip = unmapped(sock.getpeername()[0])  # a dual-stack socket: IPv4 as mapped
            dst_ip = unmapped(dst_ip)
        except OSError:
            return _reset(sock)
        dst = self.state.workloads.get(key)
        if dst is None or mtls_mode(dst, port) == "STRICT" or dst_ip not in _plain_ips(dst):
            self.stats["plain_denied"] += 1
            return _reset(sock)
        d = self.decide(dst, None, src_ip, port, dst_ip)
        if not d.allowed:
            self.stats["plain_denied"] += 1
            _log.info(
                "plaintext connection denied",
                fields={"src": src_ip, "dst": f"{key}:{port}", "reason": d.reason},
            )
            return _reset(sock)
        up = await self._dial(self._address_of(dst, ":" in dst_ip), port, local=True)
        if up is None:
            self.stats["connect_failed"] += 1
            return _reset(sock)
        self.stats["plain_inbound"] += 1
        src = self.state.by_ip.get(src_ip)
        labels = istio_labels("destination", src, dst, None, "none")
        ikey = self._report_inbound(
            up, party(src, ip=src_ip, identity=""), dst, port, "passthrough", "plaintext", d, labels
        )
        count_close = self._count_open([labels], (ikey,))
        flow = _Closer()

        def done(*_):
            self.enforced.pop(tkey, None)
            count_close()

        meta = _facts(None, src_ip, dst, port)
        tkey = self._track(meta, flow)
        flow.target = await self._splice(sock, up, done, meta)


def _plain_ips(w: wire.Workload) -> tuple[str, ...]:
    """The addresses plain.c steers to a workload's 15006 listener."""
    return (w.ip, w.ip6) if w.ip6 else (w.ip,)


def _listener_in_netns(netns: str, port: int) -> socket.socket:
    """A listening socket created inside another network namespace (it stays there): dual
    stack (IPv6 any address, IPv4 as mapped), so one socket serves both families."""
    with entered(netns):
        # No SO_REUSEPORT (nothing else joins it) and plain.c assigns this very socket;
        # a successor, while we still hold the port, takes any port: sk_lookup does not care
        s = socket.socket(socket.AF_INET6)
    try:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("::", port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            s.bind(("::", 0))
        s.listen(4096)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s
