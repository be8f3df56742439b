"""Outbound (15001): a captured connection, from the kernel's capture record to its
destination: HBONE to another node's tunnel, the splice on this node, or passthrough outside
the mesh (ztunnel's proxy/outbound.rs)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct

from .. import log
from ..control import wire
from ..control.model import waypoint_refusal
from ..node.addresses import (
    hostport,
    refused_destination,
)
from . import dial, hbone
from .facts import key_of, party
from .metrics import istio_labels
from .state import HBONE_PORT, IP_BIND_ADDRESS_NO_PORT, TUNNEL_MARK, _facts

_log = log.get("tunnel")


class Outbound:
    """Tunnel's part: the outbound listeners' connections."""

    async def _accept_loop(self, ls: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(ls)
            asyncio.ensure_future(self._outbound(sock))

    async def _outbound(self, sock: socket.socket) -> None:
        try:
            await self._outbound_inner(sock)
        except Exception as e:
            self.stats["outbound_errors"] += 1
            _log.warning(f"outbound flow failed: {e}")
            _reset(sock)

    async def _outbound_inner(self, sock: socket.socket) -> None:
        cap = self.capture.lookup_socket(sock)
        if cap is None:
            self.stats["unknown"] += 1
            _log.warning(
                "connection without a capture record, reset", fields={"peer": sock.getpeername()}
            )
            return _reset(sock)
        src = self.state.by_cgroup.get(cap.cgroup_id)
        if src is None:
            self.reload()
            src = self.state.by_cgroup.get(cap.cgroup_id)
        if src is None:
            self.stats["denied_unknown_source"] += 1
            _log.warning(
                "captured connection from an unknown workload, reset",
                fields={"cgroup_id": cap.cgroup_id},
            )
            return _reset(sock)
        peer, local = sock.getpeername()[:2], sock.getsockname()[:2]
        src_ip = peer[0]
        chosen = None  # a service's endpoint the kernel already chose (connect.c)
        if cap.svc_port and cap.svc_ip in self.state.services:
            svc, eps, port = self.resolve(cap.svc_ip, cap.svc_port)
            w = self.state.by_ip.get(cap.orig_ip)
            chosen = f"{w.namespace}/{w.name}" if w is not None else None
            if chosen in eps:
                eps, port = [chosen] + [e for e in eps if e != chosen], cap.orig_port
            else:
                chosen = None  # gone from our view meanwhile: we pick, as for any service
        else:  # no service, or one we no longer know: the endpoint as the kernel resolved it
            svc, eps, port = self.resolve(cap.orig_ip, cap.orig_port)
        v6 = ":" in cap.orig_ip  # native IPv6: the destination is reached over IPv6 too
        if self.identities is None or src.spiffe_id not in self.identities.contexts:
            # enrolled (captured and STRICT) before its certificate arrived: fail closed
            self.facts.send(
                key_of(peer, local),
                "source",
                party(src, ip=src_ip, port=peer[1]),
                party(None, ip=cap.orig_ip, port=cap.orig_port, identity=""),
                live=False,
                path="denied",
                security="none",
                verdict="deny",
                reason="the workload's certificate has not arrived yet",
            )
            self.stats["denied_no_certificate"] += 1
            _log.info(
                "connection refused: the source workload has no certificate yet",
                fields={"src": src.spiffe_id, "dst": f"{cap.orig_ip}:{cap.orig_port}"},
            )
            return _reset(sock)
        me = party(src, ip=src_ip, port=peer[1])
        asked = (cap.svc_ip, cap.svc_port) if cap.svc_port else (cap.orig_ip, cap.orig_port)
        orig = party(None, ip=asked[0], port=asked[1], identity="")

        fkey = key_of(peer, local)

        def fact(dst_party, path, verdict, reason, security="plaintext", labels=None, policy=""):
            self.facts.send(
                fkey,
                "source",
                me,
                dst_party,
                live=path not in ("denied", "failed"),
                path=path,
                security=security,
                verdict=verdict,
                reason=reason,
                policy=policy or "",
                service=f"{svc.namespace}/{svc.name}" if svc else "",
                labels=labels,
            )

        fact.key = fkey  # what _open's flows end when they close
        if svc is not None and svc.waypoint:  # sent without endpoints: to its waypoint
            if svc.waypoint_pods and await self._via_waypoint(sock, src, src_ip, svc, asked, fact):
                return
            why = waypoint_refusal(
                f"{svc.namespace}/{svc.name}",
                svc.waypoint,  # why the control plane said none serves, else why none did
                svc.waypoint_refusal
                if not svc.waypoint_pods
                else "none of its pods could be reached",
            )
            fact(orig, "denied", "deny", why)
            self.stats["no_endpoint"] += 1
            _log.info("connection refused: " + why, fields={"src": src.spiffe_id})
            return _reset(sock)
        if not eps:
            if svc is not None:
                fact(orig, "denied", "deny", f"service has no endpoint for port {cap.orig_port}")
                self.stats["no_endpoint"] += 1
                _log.info(
                    "service has no endpoint for this port, reset",
                    fields={"service": f"{svc.namespace}/{svc.name}", "port": cap.orig_port},
                )
                return _reset(sock)
            if self.cfg.registry_only:
                fact(orig, "denied", "deny", "destination outside the mesh (registry-only)")
                self.stats["denied_registry_only"] += 1
                _log.info(
                    "destination outside the mesh refused (registry-only)",
                    fields={"src": src.spiffe_id, "dst": f"{cap.orig_ip}:{cap.orig_port}"},
                )
                return _reset(sock)
            why = refused_destination(cap.orig_ip, cap.orig_port, self.node_addrs)
            if why:  # the kernel refuses these at connect(); never dial them from here
                fact(orig, "denied", "deny", f"destination refused: {why}")
                self.stats["denied_destination"] += 1
                _log.warning(
                    "passthrough to a destination the mesh never carries, reset",
                    fields={"src": src.spiffe_id, "dst": f"{cap.orig_ip}:{cap.orig_port}"},
                )
                return _reset(sock)
            self.stats["passthrough"] += 1
            up = await self._dial(cap.orig_ip, cap.orig_port, local=False)
            if up is None:
                fact(orig, "failed", "allow", "connect to the destination failed")
                return _reset(sock)
            labels = istio_labels("source", src, None, None, "none")
            fact(orig, "passthrough", "allow", "destination outside the mesh", labels=labels)
            count_close = self._count_open([labels], (fkey,))
            return await self._splice(sock, up, lambda *_: count_close())
        skey = f"{svc.namespace}/{svc.name}" if svc else eps[0]
        policy = (svc.lb_policy or "round_robin") if svc else "round_robin"
        tried: list[str] = []
        why: list[str] = []  # each failed endpoint's reason
        for _ in range(1 + (self.lb.cfg.retries if svc else 0)):
            if chosen is not None and not tried:
                ep = chosen
            else:
                ep = self.lb.pick(skey, policy, eps, tried) if svc else eps[0]
            if ep is None:
                break
            tried.append(ep)
            dst = self.state.workloads[ep]
            reached = self._address_of(dst, v6)
            # on this node we are the destination's enforcement point; across nodes its tunnel is
            d = (
                self.decide(dst, src.spiffe_id, src_ip, port, reached)
                if dst.node == self.cfg.node
                else None
            )
            if d is not None and not d.allowed:
                fact(party(dst, ip=reached, port=port), "denied", "deny", d.reason, policy=d.policy)
                self.stats["denied"] += 1
                _log.info(
                    "connection denied",
                    fields={"src": src.spiffe_id, "dst": f"{dst.ip}:{port}", "reason": d.reason},
                )
                return _reset(sock)
            try:
                done = await self._open(
                    sock, src_ip, src, dst, port, ep, svc, d, fact, addr=reached, why=why
                )
            except _Denied as e:
                fact(
                    party(dst, ip=reached, port=port),
                    "denied",
                    "deny",
                    f"denied by the destination: {e}",
                )
                self.stats["denied"] += 1
                _log.info(
                    "connection denied by the destination",
                    fields={"src": src.spiffe_id, "dst": f"{dst.ip}:{port}", "reason": str(e)},
                )
                return _reset(sock)
            if done:
                if len(tried) > 1:
                    self.stats["retried"] += 1
                return
            if svc:
                self.lb.failed(skey, ep, eps)
        self.stats["connect_failed"] += 1
        fact(
            orig,
            "failed",
            "allow",
            f"no endpoint could be connected (tried {', '.join(tried)})"
            + (f": {'; '.join(why)}" if why else ""),
        )
        _log.info(
            "no endpoint could be connected, reset",
            fields={"src": src.spiffe_id, "dst": f"{cap.orig_ip}:{cap.orig_port}", "tried": tried},
        )
        _reset(sock)

    async def _via_waypoint(self, sock, src, src_ip: str, svc, asked: tuple, fact) -> bool:
        """HBONE to one of svc's waypoint's pods, CONNECT to the address the workload asked
        for (the VIP and port: the waypoint routes by them), presenting the source's identity
        and requiring the waypoint's. False when no pod could be reached (nothing was sent)."""
        key = svc.waypoint
        pods = [k for k in svc.waypoint_pods if k in self.state.workloads]
        bag = hbone.baggage(src.namespace, src.name, src.labels.get("app", ""),
                            src.labels.get("version", ""))  # fmt: skip
        tried: list[str] = []
        why: list[str] = []
        while len(tried) < len(pods):
            k = self.lb.pick(key, "round_robin", pods, tried)
            if k is None:
                break
            tried.append(k)
            wp = self.state.workloads[k]
            try:
                conn = await self.pool.get(src.spiffe_id, wp.spiffe_id, (wp.ip, HBONE_PORT))
                stream = await conn.connect(
                    hostport(*asked), timeout=self.cfg.connect_timeout, source=src_ip,
                    baggage=bag,
                )  # fmt: skip
            except (hbone.HboneError, OSError, TimeoutError) as e:
                self.lb.failed(key, k, pods)
                _say(
                    why,
                    f"waypoint pod {k} ({hostport(wp.ip, HBONE_PORT)}): {e or type(e).__name__}",
                )
                continue
            _, side = await asyncio.get_running_loop().connect_accepted_socket(hbone.TcpSide, sock)
            self.lb.opened(k)
            labels = istio_labels("source", src, None, svc, "mutual_tls")
            fact(
                party(wp, ip=asked[0], port=asked[1]),
                "hbone",
                "allow",
                f"to waypoint {key} (pod {k})",
                "mutual_tls",
                labels,
            )
            count_close = self._count_open([labels], (fact.key,))
            side.on_close = lambda k=k, c=count_close: (self.lb.closed(k), c())
            side.attach(stream)
            self.stats["waypoint"] += 1
            return True
        _log.info(f"no pod of waypoint {key} could be reached: {'; '.join(why)}")
        return False

    def _count_open(self, keys: list[tuple], facts=()):
        """Count a flow opened under each Istio label set; returns what counts its close (and
        ends the facts of its sockets, keyed as sent)."""
        for k in keys:
            self.metrics.opened[k] += 1

        def closed():
            for k in keys:
                self.metrics.closed[k] += 1
            self.facts.closed(*facts)

        return closed

    async def _open(
        self,
        sock,
        src_ip: str,
        src: wire.Workload,
        dst: wire.Workload,
        port: int,
        ep: str,
        svc=None,
        decision=None,
        fact=None,
        addr: str = "",
        why: list[str] | None = None,
    ) -> bool:
        """Connect the flow to dst; False when the connect failed (nothing was forwarded), and
        then why, appended to why.

        decision: ours when dst is on this node; fact(dst, path, verdict, reason, ...)
        reports the source side to the agent. addr: dst's address to reach it at
        (_address_of; its IPv4 one when not given).
        """
        addr = addr or dst.ip
        if dst.node == self.cfg.node:
            up = await self._dial(addr, port, local=True)
            if up is None:
                _say(why, f"{hostport(addr, port)}: connect failed")
                return False
            self.lb.opened(ep)
            self.stats["splice"] += 1
            flow = _Closer()
            labels = [
                istio_labels(r, src, dst, svc, "node_local") for r in ("source", "destination")
            ]
            d = decision
            fact(
                party(dst, ip=addr, port=port),
                "splice",
                "allow",
                d.reason,
                "node_local",
                labels[0],
                d.policy,
            )
            try:
                me = party(src, ip=src_ip, port=sock.getpeername()[1])
            except OSError:  # the client is gone already; its record says how it ended
                me = party(src, ip=src_ip)
            ikey = self._report_inbound(
                up, me, dst, port, "splice", "node_local", d, labels[1], svc
            )
            count_close = self._count_open(labels, (fact.key, ikey))

            def done(*_):
                self.lb.closed(ep)
                self.enforced.pop(key, None)
                count_close()

            meta = _facts(src.spiffe_id, src_ip, dst, port)
            key = self._track(meta, flow)
            flow.target = await self._splice(sock, up, done, meta)
            return True
        node_addr = self.state.nodes.get(dst.node)
        if not node_addr:
            self.stats["no_node"] += 1
            _say(why, f"{hostport(addr, port)}: node {dst.node} has no known address")
            return False
        try:
            for attempt in range(4):
                conn = await self.pool.get(src.spiffe_id, dst.spiffe_id, (node_addr, HBONE_PORT))
                try:
                    stream = await conn.connect(
                        hostport(addr, port),
                        timeout=self.cfg.connect_timeout,
                        source=src_ip,
                    )
                    break
                except hbone.HboneError as e:
                    # REFUSED_STREAM: the peer took no action (too many opens at once on this
                    # connection): safe to try again, shortly
                    if not e.refused_stream or attempt == 3:
                        raise
                    self.stats["hbone_refused_stream_retries"] += 1
                    await asyncio.sleep(0.05 * (attempt + 1))
        except hbone.HboneError as e:
            if " 403" in str(e):
                raise _Denied(str(e)) from None
            _log.info(f"HBONE to {hostport(addr, port)} failed: {e}")
            _say(why, f"{hostport(addr, port)}: {e}")
            return False
        except TimeoutError:
            _log.info(f"HBONE CONNECT to {hostport(addr, port)} timed out")
            _say(why, f"{hostport(addr, port)}: HBONE CONNECT timed out")
            return False
        _, side = await asyncio.get_running_loop().connect_accepted_socket(hbone.TcpSide, sock)
        self.lb.opened(ep)
        labels = istio_labels("source", src, dst, svc, "mutual_tls")
        fact(
            party(dst, ip=addr, port=port),
            "hbone",
            "allow",
            "allowed by the destination's tunnel",
            "mutual_tls",
            labels,
        )
        count_close = self._count_open([labels], (fact.key,))
        side.on_close = lambda: (self.lb.closed(ep), count_close())
        side.attach(stream)
        self.stats["hbone"] += 1
        return True

    async def _connect(self, ip: str, port: int, local: bool) -> socket.socket:
        """Connect to ip:port within connect_timeout; local: one of this node's workloads, from
        the tunnel's address. Raises OSError or TimeoutError."""
        if local and not self._recognised:
            self.stats["not_recognised"] += 1
            raise OSError(
                errno.EPERM,
                "this tunnel's connections are not recognised (no tunops.c on its cgroup: see "
                "the agent's log); refusing to deliver rather than loop through 15006",
            )
        v6 = ":" in ip
        source = self._source6 if v6 else self._source
        if local and v6 and not source:
            raise OSError(
                errno.EADDRNOTAVAIL,
                "this tunnel has no IPv6 source address (tunnel.address6) to deliver from",
            )
        up = _tunnel_socket(socket.AF_INET6 if v6 else socket.AF_INET)
        try:
            if local and source:
                up.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)  # port at connect()
                up.bind((source, 0))
            await dial.connect(up, (ip, port), self.cfg.connect_timeout)
        except BaseException:
            up.close()
            raise
        return up

    async def _dial(self, ip: str, port: int, local: bool) -> socket.socket | None:
        """_connect, or None (logged) when it failed."""
        try:
            return await self._connect(ip, port, local)
        except (OSError, TimeoutError) as e:
            _log.info(f"connect to {hostport(ip, port)} failed: {e or 'timeout'}")
            return None

    def _adopted(self, p) -> None:
        """A spliced flow from a predecessor: enforce policy on it like on our own."""
        m = p.meta
        if not m.get("dst"):
            return
        key = self._track(m, lambda: self.splicer.kill(p, "policy"))
        p.on_close = lambda *_: self.enforced.pop(key, None)

    async def _splice(self, down: socket.socket, up: socket.socket, on_close=None, meta=None):
        loop = asyncio.get_running_loop()
        try:
            p = self.splicer.pair(down, up, on_close, meta)
            return lambda: self.splicer.kill(p, "policy")
        except OSError as e:
            # no pipe to be had (the open-file limit): relay this one in user space
            _log.warning(f"cannot splice, relaying in user space: {e}")
            self.stats["relayed"] += 1
            _, a = await loop.connect_accepted_socket(hbone.TcpSide, down)
            _, b = await loop.connect_accepted_socket(hbone.TcpSide, up)
            if on_close is not None:
                a.on_close = on_close
            _couple(a, b)
            return lambda: (hbone.rst(a.transport), hbone.rst(b.transport))


class _Closer:
    """Closes a flow whose closing function is known only after it was set up."""

    target = None

    def __call__(self):
        if self.target is not None:
            self.target()


class _Denied(Exception):
    """The destination's tunnel refused the flow by policy (HBONE 403)."""


def _couple(a: hbone.TcpSide, b: hbone.TcpSide) -> None:
    """Relay two TCP sides in user space, half-close included (the rare non-splice case)."""

    class _Half:
        """What a TcpSide sees as its stream: the other side's transport."""

        early: list = []  # (nothing arrives before attach here)
        early_end = False

        def __init__(self, src: hbone.TcpSide, out: hbone.TcpSide):
            self.src = src
            self.out = out
            self.closed = False
            self.conn = self
            self.tcp_paused = False

        def send(self, data):
            if not self.out.lost:
                self.out.transport.write(data)

        def end(self):
            if not self.out.lost and self.out.transport.can_write_eof():
                self.out.transport.write_eof()
            if self.out.eof or self.out.lost:  # both directions are done: close both
                self.closed = True
                self.src.transport.close()
                self.out.transport.close()

        def reset(self):
            self.closed = True
            if not self.out.lost:
                hbone.rst(self.out.transport)

        def ack_pending(self, _):
            pass

    a.attach(_Half(a, b))
    b.attach(_Half(b, a))


def _tunnel_socket(family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, TUNNEL_MARK)
    s.setblocking(False)
    return s


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _say(why: list[str] | None, reason: str) -> None:
    if why is not None:
        why.append(reason)
