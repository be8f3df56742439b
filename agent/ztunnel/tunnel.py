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
import ctypes
import errno
import ipaddress
import json
import os
import socket
import struct
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field

from .. import log, systemd
from ..bpf import abi, names
from ..bpf.capture import CaptureReader
from ..bpf.sys import Map
from ..control import model as m
from ..control.convert import policy_from_pb, root_of
from ..control.model import mtls_mode, plaintext_ports
from ..control.proto import control_pb2 as pb
from ..control.store import ENROLLED_FILE
from ..netns import entered
from ..node.addresses import (
    hostport,
    node_addresses,
    refused_destination,
    split_hostport,
    unmapped,
)
from . import admin, handoff, hbone, inbound, lb, listeners, tls
from .facts import FactsSender, key_of, party
from .metrics import TunnelMetrics, istio_labels, merge_exposition
from .policy import Request, evaluate
from .splice import Splicer
from .workers import Workers

_log = log.get("tunnel")

HBONE_PORT = 15008
TUNNEL_MARK = 0x539  # SO_MARK of the tunnel's own sockets: connect4 never captures them
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # linux/in.h


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return 0


RETIRED_ROOT_DRAIN = 10.0  # s a connection a retired root authenticated may finish its flows


def _roots(bundle_pem: bytes) -> set[bytes]:
    """The roots of a trust bundle, as DER."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    if not bundle_pem:
        return set()
    return {c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(bundle_pem)}


def _enrolled(path: str) -> dict[int, str]:
    """The agent's enrolled.json: {cgroup id: namespace/name}; {} when there is none yet."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return {}
    return {int(k): str(v) for k, v in doc.items()}


@dataclass
class TunnelConfig:
    node: str
    state_dir: str  # the agent's: snapshot.pb, certs/
    maps_dir: str  # pinned maps of the node's datapath
    outbound: tuple[str, int]  # where connect4 sends captured connections
    inbound: tuple[str, int]  # HBONE listener
    outbound6: tuple[str, int] | None = None  # where connect6 sends captured native IPv6
    registry_only: bool = False
    connect_timeout: float = 5.0
    handshake_timeout: float = 10.0  # inbound TLS handshakes that stall are cut after this
    readiness_port: int = 15021  # on the inbound address: /healthz/ready
    plain_port: int = 15006  # plaintext inbound, inside each PERMISSIVE workload's namespace
    metrics_port: int = 15020  # on the inbound address: Prometheus /metrics
    admin: tuple[str, int] = ("127.0.0.1", 15000)  # /config_dump, /stats, /connections
    lb: lb.LbConfig = field(default_factory=lambda: lb.LbConfig())
    policy_recheck: bool = True  # a policy change also closes established flows it denies
    drain: float = 30.0  # on SIGTERM: how long open flows may go on before we close them
    workers: int = 1  # processes sharing the listening sockets; 0: as the load asks, up to cores
    worker: int = 0  # this process's index; 0 runs admin, metrics, 15006 and the other workers
    argv: list = field(default_factory=list)  # `dabba tunnel run` arguments, to start workers
    # the source address of connections to this node's workloads: one of the agent's
    # tunnel_addresses, which plain.c and the ingress guard let through as the tunnel's own
    # (a route's own choice, e.g. a veth's address, would be taken for a plaintext peer);
    # "": the outbound listener's address
    source: str = ""
    # the same for IPv6 connections to this node's workloads; "": the IPv6 outbound listener's
    # address, and without one this node's workloads are reached over IPv4 only
    source6: str = ""


@dataclass
class State:
    """What the tunnel knows, rebuilt from each snapshot."""

    version: int = 0
    trust_domain: str = "cluster.local"
    bundle: bytes = b""
    by_ip: dict[str, pb.Workload] = field(default_factory=dict)
    by_cgroup: dict[int, pb.Workload] = field(default_factory=dict)  # local workloads
    services: dict[str, pb.Service] = field(default_factory=dict)  # by VIP
    nodes: dict[str, str] = field(default_factory=dict)
    policies: list[m.AuthorizationPolicy] = field(default_factory=list)
    workloads: dict[str, pb.Workload] = field(default_factory=dict)  # by namespace/name
    revoked: frozenset[str] = frozenset()  # serials of revoked nodes' certificates


def _model(w: pb.Workload) -> m.Workload:
    return m.Workload(
        w.name, w.namespace, w.service_account, w.node, w.ip, dict(w.labels), ip6=w.ip6
    )


class Tunnel:
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

    # ---- state ------------------------------------------------------------------------------------
    def _cert_files(self, spiffe_id: str) -> tuple[str, str]:
        w = next((w for w in self.state.by_cgroup.values() if w.spiffe_id == spiffe_id), None)
        if w is None:
            raise hbone.HboneError(f"no local workload holds {spiffe_id}")
        svid = os.path.join(self.cfg.state_dir, "certs", w.namespace, w.name, "svid.pem")
        return svid, svid

    def reload(self) -> bool:
        """Load a changed snapshot or certificate; on any error keep the last good state."""
        try:
            return self._reload()
        except Exception as e:
            self.stats["reload_errors"] += 1
            self._stamp = None  # try again next time
            _log.error(f"state reload failed, keeping version {self.state.version}: {e}")
            return False

    def _reload(self) -> bool:
        path = os.path.join(self.cfg.state_dir, "snapshot.pb")
        certs = os.path.join(self.cfg.state_dir, "certs")
        enrolled_path = os.path.join(self.cfg.state_dir, ENROLLED_FILE)
        try:
            stamp = (
                os.stat(path).st_mtime_ns,
                _mtime(enrolled_path),
                max(
                    (
                        os.stat(os.path.join(dp, f)).st_mtime_ns
                        for dp, _, fs in os.walk(certs)
                        for f in fs
                    ),
                    default=0,
                ),
            )
        except FileNotFoundError:
            return False
        if stamp == self._stamp:
            return False
        with open(path, "rb") as f:
            snap = pb.Snapshot.FromString(f.read())
        st = State(
            version=snap.version, trust_domain=snap.trust_domain, bundle=snap.trust_bundle_pem
        )
        for w in snap.workloads:
            st.by_ip[w.ip] = w
            if w.ip6:
                st.by_ip[w.ip6] = w
            st.workloads[f"{w.namespace}/{w.name}"] = w
            if w.node == self.cfg.node and w.cgroup:
                with contextlib.suppress(OSError):
                    st.by_cgroup[os.stat(w.cgroup).st_ino] = w
        # what the agent enrolled, by cgroup id: Kubernetes pods too, whose cgroups the agent
        # finds by their UID (the snapshot names none)
        for cg, key in _enrolled(enrolled_path).items():
            w = st.workloads.get(key)
            if w is not None and w.node == self.cfg.node:
                st.by_cgroup[cg] = w
        st.services = {s.vip: s for s in snap.services}
        st.nodes = {n.name: n.address for n in snap.nodes}
        st.revoked = frozenset(snap.revoked_serials)
        st.policies = [policy_from_pb(p, root_of(snap)) for p in snap.policies]
        ids = tls.ServerIdentities(st.trust_domain, st.bundle)
        for w in st.by_cgroup.values():
            svid = os.path.join(self.cfg.state_dir, "certs", w.namespace, w.name, "svid.pem")
            if os.path.exists(svid):
                ids.set(w.spiffe_id, svid, svid)
        old_policies, old_modes = self.state.policies, _modes(self.state)
        old_revoked, old_bundle = self.state.revoked, self.state.bundle
        self.node_addrs = set(node_addresses())
        self.state, self._stamp = st, stamp
        if self._listening:
            self._sync_plain()
        if self.cfg.policy_recheck and (st.policies != old_policies or _modes(st) != old_modes):
            self.recheck()
        bundle_changed = self.identities is not None and st.bundle != self.identities.bundle_pem
        if self.identities is None or bundle_changed:
            # OpenSSL verifies client certificates against the listener's own context even
            # after SNI selects another, and a context's store only grows: a new bundle (a
            # rotation adds a root, a retirement removes one) gets a new default context
            self.identities = ids
            if self.listener is not None:
                self.listener.ctx = ids.default
        else:  # the listener keeps its default context; swap the per-identity ones in place
            self.identities.contexts = ids.contexts
        old_pool = self.pool
        self.pool = (
            hbone.Pool(st.trust_domain, st.bundle, self._cert_files, revoked=self._is_revoked)
            if self.pool is None or self.pool.bundle_pem != st.bundle
            else self.pool
        )
        # a root added (a rotation's first phase) leaves every connection trusted; a root
        # removed (retired) or a node revoked does not
        root_retired = bundle_changed and not _roots(old_bundle) <= _roots(st.bundle)
        if root_retired or not st.revoked <= old_revoked:
            self._drop_untrusted(old_pool, root_retired)
        _log.info(
            "state loaded",
            fields={
                "version": st.version,
                "local": len(st.by_cgroup),
                "workloads": len(st.by_ip),
                "policies": len(st.policies),
            },
        )
        return True

    def _drop_untrusted(self, old_pool, root_retired: bool) -> None:
        """After a root was retired or a node revoked: close every HBONE connection, either
        way, whose peer certificate belongs to a revoked node (at once) or no current root
        signed (a retired root's: no new flow, the open ones get RETIRED_ROOT_DRAIN seconds).
        After a retirement, the old pool's other connections take no new flow and close when
        their flows end."""
        bundle = self.state.bundle
        old = list(old_pool.conns.values()) if old_pool and old_pool is not self.pool else []
        sides = [*(self.listener.conns if self.listener else ()), *old,
                 *(self.pool.conns.values() if self.pool else ())]  # fmt: skip
        closed = 0
        for c in sides:
            tr = c.transport
            if tr is None or tr.is_closing():
                continue
            sslobj = tr.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj else None
            if self._is_revoked(tls.peer_serial(sslobj)):
                tr.abort()  # a revoked node: at once
                closed += 1
            elif root_retired and not tls.signed_by_any(der, bundle):
                c.drain(RETIRED_ROOT_DRAIN)  # its open flows end, within seconds
                closed += 1
            elif c in old:
                c.retire()
        self.stats["hbone_untrusted_closed"] += closed
        if closed:
            _log.warning(
                "HBONE connections closed: their peer's certificate is no longer trusted (a "
                "retired root, or a revoked node)",
                fields={"closed": closed},
            )

    # ---- plaintext inbound (15006) ----------------------------------------------------------
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
        count_close = self._count_open([labels])
        self._report_inbound(
            up, party(src, ip=src_ip, identity=""), dst, port, "passthrough", "plaintext", d, labels
        )
        flow = _Closer()

        def done(*_):
            self.enforced.pop(tkey, None)
            count_close()

        meta = _facts(None, src_ip, dst, port)
        tkey = self._track(meta, flow)
        flow.target = await self._splice(sock, up, done, meta)

    def _report_inbound(self, up, src: dict, dst, port, path, security, d, labels, svc=None):
        """Tell the agent about the workload socket we connected to (the destination's end)."""
        try:
            peer = up.getpeername()
            key = key_of(peer, up.getsockname())
        except OSError:
            return  # already gone: the kernel's record says how it ended
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

    def recheck(self) -> int:
        """Close established flows that the current policy denies; returns how many."""
        closed = 0
        for key, f in list(self.enforced.items()):
            dst = self.state.workloads.get(f.dst)
            d = self.decide(dst, f.src_identity, f.src_ip, f.port) if dst is not None else None
            strict = (
                dst is not None and f.src_identity is None and mtls_mode(dst, f.port) == "STRICT"
            )
            if d is not None and d.allowed and not strict:
                continue
            if strict:  # a plaintext flow (15006) to a workload that is STRICT now
                reason = f"{f.dst} is STRICT now: plaintext is no longer accepted"
            else:
                reason = d.reason if d else f"workload {f.dst} is gone"
            _log.info(
                "established flow closed: policy now denies it",
                fields={
                    "src": f.src_identity or f.src_ip,
                    "dst": f"{f.dst}:{f.port}",
                    "reason": reason,
                },
            )
            self.enforced.pop(key, None)
            f.close()
            closed += 1
        self.stats["recheck_closed"] += closed
        return closed

    def _track(self, facts: dict, close) -> int:
        """Remember a flow this tunnel decided (see _facts), for policy recheck."""
        key = id(close)
        self.enforced[key] = _Enforced(**facts, close=close)
        return key

    # ---- decisions ------------------------------------------------------------------------------------
    def resolve(self, ip: str, port: int):
        """(service or None, endpoints, destination port) for an original destination.

        A VIP gives its service, its endpoints (workload keys) and the target
        port (no endpoints: nothing can serve that port); a workload address
        gives that workload alone.
        """
        svc = self.state.services.get(ip)
        if svc is not None:
            sp = next((p for p in svc.ports if p.port == port), None)
            eps = [k for k in svc.endpoints if k in self.state.workloads]
            return svc, (eps if sp else []), (sp.target_port if sp else port)
        w = self.state.by_ip.get(ip)
        return None, ([f"{w.namespace}/{w.name}"] if w else []), port

    def decide(
        self,
        dst: pb.Workload,
        src_identity: str | None,
        src_ip: str,
        port: int,
        dst_ip: str = "",
    ):
        """The destination's policy on a flow; dst_ip: the address it was reached at (the
        workload's IPv4 address when not given)."""
        return evaluate(
            self.state.policies,
            _model(dst),
            Request(src_ip, dst_ip or dst.ip, port, src_identity),
        )

    def _address_of(self, dst: pb.Workload, v6: bool) -> str:
        """Where to reach dst: its IPv6 address for a flow that came as IPv6 (when it has one,
        and, on this node, when this tunnel can deliver IPv6 from a source the guard knows),
        else its IPv4 address."""
        if v6 and dst.ip6 and (dst.node != self.cfg.node or self._source6):
            return dst.ip6
        return dst.ip

    # ---- outbound -------------------------------------------------------------------------------------------
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

        def fact(dst_party, path, verdict, reason, security="plaintext", labels=None, policy=""):
            self.facts.send(
                key_of(peer, local),
                "source",
                me,
                dst_party,
                path=path,
                security=security,
                verdict=verdict,
                reason=reason,
                policy=policy or "",
                service=f"{svc.namespace}/{svc.name}" if svc else "",
                labels=labels,
            )

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
            count_close = self._count_open([labels])
            return await self._splice(sock, up, lambda *_: count_close())
        skey = f"{svc.namespace}/{svc.name}" if svc else eps[0]
        policy = (svc.lb_policy or "round_robin") if svc else "round_robin"
        tried: list[str] = []
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
                    sock, src_ip, src, dst, port, ep, svc, d, fact, addr=reached
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
        fact(orig, "failed", "allow", f"no endpoint could be connected (tried {', '.join(tried)})")
        _log.info(
            "no endpoint could be connected, reset",
            fields={"src": src.spiffe_id, "dst": f"{cap.orig_ip}:{cap.orig_port}", "tried": tried},
        )
        _reset(sock)

    def _count_open(self, keys: list[tuple]):
        """Count a flow opened under each Istio label set; returns what counts its close."""
        for k in keys:
            self.metrics.opened[k] += 1

        def closed():
            for k in keys:
                self.metrics.closed[k] += 1

        return closed

    async def _open(
        self,
        sock,
        src_ip: str,
        src: pb.Workload,
        dst: pb.Workload,
        port: int,
        ep: str,
        svc=None,
        decision=None,
        fact=None,
        addr: str = "",
    ) -> bool:
        """Connect the flow to dst; False when the connect failed (nothing was forwarded).

        decision: ours when dst is on this node; fact(dst, path, verdict, reason, ...)
        reports the source side to the agent. addr: dst's address to reach it at
        (_address_of; its IPv4 one when not given).
        """
        addr = addr or dst.ip
        if dst.node == self.cfg.node:
            up = await self._dial(addr, port, local=True)
            if up is None:
                return False
            self.lb.opened(ep)
            self.stats["splice"] += 1
            flow = _Closer()
            labels = [
                istio_labels(r, src, dst, svc, "node_local") for r in ("source", "destination")
            ]
            count_close = self._count_open(labels)
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
            self._report_inbound(up, me, dst, port, "splice", "node_local", d, labels[1], svc)

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
            return False
        except TimeoutError:
            _log.info(f"HBONE CONNECT to {hostport(addr, port)} timed out")
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
        count_close = self._count_open([labels])
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
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(up, (ip, port)), self.cfg.connect_timeout
            )
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

    # ---- inbound --------------------------------------------------------------------------------------------
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

    async def _inbound(self, authority: str, client_id: str | None, client_ip: str):
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
        count_close = self._count_open([labels])
        peer = party(src, ip=client_ip, identity=client_id or "")
        self._report_inbound(up, peer, dst, port, "hbone", "mutual_tls", d, labels)
        side.on_close = lambda: (self.enforced.pop(key, None), count_close())
        return side

    # ---- operations -------------------------------------------------------------------------------------
    async def merged_metrics(self) -> tuple[int, str]:
        """The tunnel's metrics and the agent's (kernel byte counts, certificates, maps), like
        Istio's merged 15020: one scrape target per node."""
        _, mine = self.metrics.render()
        try:
            status, body = await admin.get_unix(self._agent_sock(), "/metrics", timeout=3)
            if status == 200:
                return 200, merge_exposition(mine, body.decode())
            why = f"status {status}"
        except (OSError, TimeoutError, ValueError, IndexError) as e:
            why = str(e) or type(e).__name__
        return 200, mine + (
            f"# the agent's metrics are unavailable: {why}\n"
            "# HELP dabba_agent_up Whether the tunnel could read the agent's metrics\n"
            "# TYPE dabba_agent_up gauge\ndabba_agent_up 0.0\n"
        )

    def _agent_sock(self) -> str:
        return os.path.join(self.cfg.state_dir, "agent.sock")

    @admin.with_query
    async def flows(self, query: dict) -> tuple[int, object]:
        """The agent's flow table (the kernel's records joined with this tunnel's facts)."""
        target = "/flows" + ("?" + urllib.parse.urlencode(query) if query else "")
        try:
            status, body = await admin.get_unix(self._agent_sock(), target)
        except (OSError, TimeoutError) as e:
            return 503, {"error": f"the agent is not answering on {self._agent_sock()}: {e}"}
        return status, json.loads(body)

    def _check_recognised(self) -> None:
        was, self._recognised = self._recognised, os.path.exists(self._tun_ops)
        if was != self._recognised:
            (_log.info if self._recognised else _log.error)(
                "connections to this node's workloads "
                + ("are recognised again" if self._recognised else "are not recognised: refused"),
                fields={"tunops": self._tun_ops},
            )

    def ready(self) -> tuple[int, str]:
        ok = (
            self._listening
            and self.state.version > 0
            and bool(self.identities and self.identities.contexts)
        )
        return (200, "ready\n") if ok else (503, "not ready\n")

    def config_dump(self) -> tuple[int, dict]:
        """What the tunnel holds, without secrets (no key material, no key paths)."""
        from cryptography import x509

        from ..control import ca as camod

        certs = []
        for w in self.state.by_cgroup.values():
            chain = os.path.join(self.cfg.state_dir, "certs", w.namespace, w.name, "chain.pem")
            try:
                with open(chain, "rb") as f:
                    leaf = x509.load_pem_x509_certificate(f.read())
                certs.append(
                    {
                        "identity": w.spiffe_id,
                        "serial": format(leaf.serial_number, "x"),
                        "not_after": leaf.not_valid_after_utc.isoformat(),
                        "issuer": leaf.issuer.rfc4514_string(),
                    }
                )
            except (OSError, ValueError):
                certs.append({"identity": w.spiffe_id, "error": "no certificate"})
        return 200, {
            "node": self.cfg.node,
            "version": self.state.version,
            "trust_domain": self.state.trust_domain,
            "roots": [
                camod.fingerprint(r) for r in x509.load_pem_x509_certificates(self.state.bundle)
            ]
            if self.state.bundle
            else [],
            "listeners": {
                "outbound": self.cfg.outbound,
                "inbound": self.cfg.inbound,
                "readiness": [self.cfg.inbound[0], self.cfg.readiness_port],
                "admin": self.cfg.admin,
            },
            "local_workloads": [
                {
                    "name": w.name,
                    "namespace": w.namespace,
                    "identity": w.spiffe_id,
                    "ip": w.ip,
                    "mtls_mode": w.mtls_mode,
                    "port_mtls": {str(p): v for p, v in sorted(w.port_mtls.items())},
                }
                for w in self.state.by_cgroup.values()
            ],
            "workloads": len(self.state.by_ip),
            "services": [
                {
                    "name": s.name,
                    "namespace": s.namespace,
                    "vip": s.vip,
                    "endpoints": list(s.endpoints),
                    "lb_policy": s.lb_policy,
                }
                for s in self.state.services.values()
            ],
            "nodes": self.state.nodes,
            "policies": [
                {"name": p.key, "action": p.action, "rules": len(p.rules), "origin": p.origin}
                for p in self.state.policies
            ],
            "certificates": certs,
        }

    def connections(self) -> tuple[int, dict]:
        pools = []
        if self.pool:
            for (src, dst, node), c in self.pool.conns.items():
                if c.transport and not c.transport.is_closing():
                    pools.append(
                        {"source": src, "destination": dst, "node": node, "streams": len(c.streams)}
                    )

        def describe(c):
            out = []
            for sid, st in list(c.streams.items())[:50]:
                hs = c.h2.streams.get(sid)
                out.append(
                    {
                        "id": sid,
                        "authority": st.authority,
                        "h2_state": str(hs.state_machine.state) if hs else "gone",
                        "tcp_eof": st.tcp.eof if st.tcp else None,
                        "tcp_lost": st.tcp.lost if st.tcp else None,
                        "end_pending": st.end_pending,
                        "outbuf": len(st.outbuf),
                        "in": st.bytes_in,
                        "out": st.bytes_out,
                    }
                )
            return out

        open_streams = []
        if self.pool:
            for c in self.pool.conns.values():
                open_streams += describe(c)
        if self.listener is not None:
            for c in list(self.listener.conns):
                open_streams += describe(c)
        return 200, {
            "open_streams": open_streams[:100],
            "hbone_connections": pools,
            "hbone_handshakes": self.pool.handshakes if self.pool else 0,
            "splice_pairs": self.splicer.active,
        }

    def stats_doc(self) -> tuple[int, dict]:
        """Counters of every worker summed (each worker's own under "workers")."""
        totals = Counter(self.stats)
        per = [{"worker": 0, "pid": os.getpid(), **self.stats}]
        refused = Counter(self.listener.refused if self.listener else {})
        pairs = self.splicer.active
        for r in self.workers.reports():
            totals.update(r["stats"])
            refused.update(r["refused"])
            pairs += r["splice_pairs"]
            per.append({"worker": r["worker"], "pid": r["pid"], **r["stats"]})
        doc = {**totals, "lb": self.lb.snapshot(), "enforced_flows": len(self.enforced)}
        doc["workers"] = per
        if self.listener is not None:
            doc["hbone_refused"] = dict(refused)
            doc["hbone_accepted"] = self.listener.accepted
            doc["hbone_handshaking"] = self.listener.handshaking
        doc["splice_pairs"] = pairs
        doc["relayed_sides"] = hbone.TcpSide.open + sum(
            r.get("relayed_sides", 0) for r in self.workers.reports()
        )
        return 200, doc

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


def _plain_ips(w: pb.Workload) -> tuple[str, ...]:
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


def _modes(st: State) -> dict[str, tuple]:
    """Each workload's peer authentication modes (a change to STRICT closes plaintext)."""
    return {
        f"{w.namespace}/{w.name}": (w.mtls_mode, sorted(w.port_mtls.items()))
        for w in st.workloads.values()
    }


def _facts(src_identity: str | None, src_ip: str, dst: pb.Workload, port: int) -> dict:
    """What policy recheck needs of a flow; handed to a successor with spliced flows too."""
    return {
        "src_identity": src_identity,
        "src_ip": src_ip,
        "dst": f"{dst.namespace}/{dst.name}",
        "port": port,
    }


@dataclass
class _Enforced:
    """An established flow this tunnel let through as its destination's enforcement point."""

    src_identity: str | None
    src_ip: str
    dst: str  # namespace/name
    port: int
    close: object  # callable: reset both ends


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


def parse_hostport(text: str, version: int = 4) -> tuple[str, int]:
    """IP:PORT (version 4) or [IPv6]:PORT (version 6); ValueError for anything else."""
    host, port = split_hostport(text)
    if ipaddress.ip_address(host).version != version:
        raise ValueError(f"{text!r} is not an IPv{version} address and port")
    return host, port
