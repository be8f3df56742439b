"""What the tunnel knows and decides: its configuration, the snapshot it enforces (reloaded
from the agent's state folder when it changes), where a destination resolves to, the policy
decision on a flow, and the flows it decided (rechecked when policies change: ztunnel's
connection manager)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass, field

from .. import certread, log
from ..control import model as m
from ..control import wire
from ..control.convert import policy_from_pb, root_of
from ..control.model import mtls_mode
from ..control.store import ENROLLED_FILE
from ..node.addresses import (
    node_addresses,
)
from . import hbone, lb, tls
from .policy import Request, evaluate

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
    return set(certread.pem_blocks(bundle_pem))


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
    by_ip: dict[str, wire.Workload] = field(default_factory=dict)
    by_cgroup: dict[int, wire.Workload] = field(default_factory=dict)  # local workloads
    local_by_id: dict[str, wire.Workload] = field(default_factory=dict)  # the same by SPIFFE ID
    services: dict[str, wire.Service] = field(default_factory=dict)  # by VIP
    nodes: dict[str, str] = field(default_factory=dict)
    policies: list[m.AuthorizationPolicy] = field(default_factory=list)
    workloads: dict[str, wire.Workload] = field(default_factory=dict)  # by namespace/name
    revoked: frozenset[str] = frozenset()  # serials of revoked nodes' certificates


def _model(w: wire.Workload) -> m.Workload:
    return m.Workload(
        w.name, w.namespace, w.service_account, w.node, w.ip, dict(w.labels), ip6=w.ip6
    )


class Snapshot:
    """Tunnel's part: the snapshot and certificates it holds, resolution and decisions."""

    # ---- state ------------------------------------------------------------------------------------
    def _cert_files(self, spiffe_id: str) -> tuple[str, str]:
        w = self.state.local_by_id.get(spiffe_id)
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
            snap = wire.Snapshot.FromString(f.read())
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
        st.local_by_id = {w.spiffe_id: w for w in st.by_cgroup.values()}
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
        dst: wire.Workload,
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

    def _address_of(self, dst: wire.Workload, v6: bool) -> str:
        """Where to reach dst: its IPv6 address for a flow that came as IPv6 (when it has one,
        and, on this node, when this tunnel can deliver IPv6 from a source the guard knows),
        else its IPv4 address."""
        if v6 and dst.ip6 and (dst.node != self.cfg.node or self._source6):
            return dst.ip6
        return dst.ip


def _modes(st: State) -> dict[str, tuple]:
    """Each workload's peer authentication modes (a change to STRICT closes plaintext)."""
    return {
        f"{w.namespace}/{w.name}": (w.mtls_mode, sorted(w.port_mtls.items()))
        for w in st.workloads.values()
    }


def _facts(src_identity: str | None, src_ip: str, dst: wire.Workload, port: int) -> dict:
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
