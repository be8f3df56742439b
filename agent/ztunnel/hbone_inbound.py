"""Inbound HBONE streams (15008): who the client is, whether its forwarded address is vouched
for, the destination's policy, then the workload connected from the tunnel's own address
(ztunnel's proxy/inbound.rs). The listener itself is inbound.py."""

from __future__ import annotations

import asyncio

from .. import log
from ..node.addresses import (
    split_hostport,
)
from . import hbone
from .facts import key_of, party
from .metrics import istio_labels
from .state import _facts

_log = log.get("tunnel")


class HboneInbound:
    """Tunnel's part: a stream the HBONE listener accepted, and reporting inbound flows."""

    def _report_inbound(self, up, src: dict, dst, port, path, security, d, labels, svc=None):
        """Tell the agent about the workload socket we connected to (the destination's end);
        returns the fact's key (None: the socket is gone already)."""
        try:
            peer = up.getpeername()
            key = key_of(peer, up.getsockname())
        except OSError:
            return None  # already gone: the kernel's record says how it ended
        self.facts.send(
            key,
            "destination",
            src,
            party(dst, ip=peer[0], port=port),  # the address it was reached at
            path=path,
            security=security,
            verdict="allow",
            reason=d.reason,
            policy=d.policy or "",
            service=f"{svc.namespace}/{svc.name}" if svc else "",
            labels=labels,
        )
        return key

    def _is_revoked(self, serial: str | None) -> bool:
        return serial is not None and serial in self.state.revoked

    def _vouch(self, addr: str, client_id: str | None, peer_ip: str) -> bool:
        """Whether an HBONE client may say its flow comes from addr (Forwarded for=): only a
        workload of the client's own identity, on the node the connection comes from."""
        w = self.state.by_ip.get(addr)
        ok = (
            w is not None
            and w.spiffe_id == client_id
            and self.state.nodes.get(w.node, "") == peer_ip
        )
        if not ok:
            self.stats["forwarded_refused"] += 1
        return ok

    def _relayed(self, addr: str, client_id: str | None, peer_ip: str) -> bool:
        """Whether the client is a waypoint relaying a flow of the mesh workload at addr (its
        Forwarded for=): the connection comes from a waypoint's pod, with its identity."""
        w, orig = self.state.by_ip.get(peer_ip), self.state.by_ip.get(addr)
        ok = w is not None and bool(w.waypoint) and w.spiffe_id == client_id and orig is not None
        if ok:
            self.stats["forwarded_by_waypoint"] += 1
        return ok

    async def _inbound(
        self, authority: str, client_id: str | None, client_ip: str, original: str = ""
    ):
        """original: the flow's source before the waypoint that relays it (client_ip is the
        waypoint's, as its identity and the policy's source)."""
        host, port = split_hostport(authority)  # checked by the HBONE server already
        dst = self.state.by_ip.get(host)
        if dst is None or dst.node != self.cfg.node:
            self.stats["inbound_unknown"] += 1
            return f"no workload {host} on node {self.cfg.node}"
        d = self.decide(dst, client_id, client_ip, port, host)
        if not d.allowed:
            self.stats["inbound_denied"] += 1
            _log.info(
                "inbound denied", fields={"src": client_id, "dst": authority, "reason": d.reason}
            )
            return d.reason
        loop = asyncio.get_running_loop()
        try:
            up = await self._connect(self._address_of(dst, ":" in host), port, local=True)
        except (OSError, TimeoutError) as e:
            return f"connect to {authority} failed: {e}"
        _, side = await loop.connect_accepted_socket(hbone.TcpSide, up)
        self.stats["inbound"] += 1

        def close():
            if side.stream is not None and not side.stream.closed:
                side.stream.reset()
            hbone.rst(side.transport)

        key = self._track(_facts(client_id, client_ip, dst, port), close)
        src = self.state.by_ip.get(client_ip)
        labels = istio_labels("destination", src, dst, None, "mutual_tls")
        peer = party(src, ip=client_ip, identity=client_id or "")
        if original:  # through a waypoint: who the flow came from before it
            peer["original"] = party(self.state.by_ip.get(original), ip=original)
        ikey = self._report_inbound(up, peer, dst, port, "hbone", "mutual_tls", d, labels)
        count_close = self._count_open([labels], (ikey,))
        side.on_close = lambda: (self.enforced.pop(key, None), count_close())
        return side
