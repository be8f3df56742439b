"""Envoy's aggregated discovery service (state of the world), for waypoints.

A waypoint's Envoy calls the control plane with the node certificate of the node it runs on
(`dabba waypoint run` hands it over) and its node id ``<namespace>/<name>``: the stream is
served only when that Gateway exists and one of its pods is scheduled on that node. It gets
clusters, then listeners (Envoy warms clusters before the listeners that use them), again on
every registry change that changes them. Envoy's answer to each is its next request: the
version it now runs (an ACK) or the one it kept and why (a NACK, error_detail). Both are logged
and kept for `dabba control status` (waypoints); the version Envoy accepted stays in force
there, as Envoy keeps it.
"""

from __future__ import annotations

import time
import urllib.parse
import uuid

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2

# typed_config types the resources use: importing registers them for Any
from envoy.config.trace.v3 import opentelemetry_pb2, zipkin_pb2  # noqa: F401
from envoy.extensions.access_loggers.grpc.v3 import als_pb2  # noqa: F401
from envoy.extensions.filters.http.fault.v3 import fault_pb2  # noqa: F401
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.http.set_filter_state.v3 import (  # noqa: F401
    set_filter_state_pb2,
)
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.transport_sockets.internal_upstream.v3 import (  # noqa: F401
    internal_upstream_pb2,
)
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, json_format

from ... import log
from . import waypoint as wpmod
from .streams import Requests

_log = log.get("xds")

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
ORDER = (CDS, LDS)  # clusters before the listeners that use them
_MESSAGE = {CDS: cluster_pb2.Cluster, LDS: listener_pb2.Listener}


class XdsError(ValueError):
    """A resource that is not valid Envoy configuration (a bug here, not the user's input)."""


def pack(type_url: str, resources: list[dict]) -> list[any_pb2.Any]:
    out = []
    for res in resources:
        msg = _MESSAGE[type_url]()
        try:
            json_format.ParseDict(res, msg)
        except json_format.ParseError as e:
            raise XdsError(f"{res.get('name')}: {e}") from None
        a = any_pb2.Any()
        a.Pack(msg)
        out.append(a)
    return out


class WaypointStatus:
    """What the control plane knows of one waypoint's Envoy."""

    def __init__(self, key: str, node: str):
        self.key, self.node = key, node
        self.connected = time.time()
        self.sent: dict[str, str] = {}  # type -> version last sent
        # type -> the registry state (ControlPlane.version) the version sent / in force was
        # made from: Envoy runs the configuration of state in_force_for() and before
        self.sent_for: dict[str, int] = {}
        self.in_force: dict[str, int] = {}
        self.accepted: dict[str, str] = {}  # type -> version Envoy runs
        self.rejected: dict[str, tuple[str, str]] = {}  # type -> (version, Envoy's reason)
        self.skipped: list[str] = []

    def in_force_for(self) -> int:
        """The registry state whose configuration Envoy runs (0: not yet all of it)."""
        return min((self.in_force.get(t, 0) for t in ORDER), default=0)

    def doc(self) -> dict:
        short = {CDS: "clusters", LDS: "listeners"}
        return {
            "waypoint": self.key,
            "node": self.node,
            "connected": self.connected,
            "sent": {short[k]: v for k, v in self.sent.items()},
            "in_force_for": self.in_force_for(),
            "accepted": {short[k]: v for k, v in self.accepted.items()},
            "rejected": {
                short[k]: {"version": v, "reason": why} for k, (v, why) in self.rejected.items()
            },  # fmt: skip
            "skipped_endpoints": self.skipped,
        }


class Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """cp: the ControlPlane; caller_of(ctx) -> ("node", name) or ("workload", "ns/sa"), from
    the caller's certificate (it aborts the call otherwise).

    A waypoint's Envoy connects with its own certificate, as Istio's do (the identity of the
    Gateway namespace/name is ns/<namespace>/sa/<name>), from the address of one of its pods:
    it holds nothing of its node's. A node's certificate is taken too, for a node that runs one
    of the waypoint's pods."""

    def __init__(self, cp, caller_of):
        self.cp, self.caller_of = cp, caller_of
        self.status: dict[str, WaypointStatus] = {}

    def _resources(self, key: str) -> tuple[dict[str, list[dict]], list[str]]:
        st = self.cp.registry.state
        wp = st.waypoints.get(key)
        if wp is None:
            return {CDS: [], LDS: []}, []
        cfg = self.cp.cfg
        b = wpmod.build(st, wp, cfg.trust_domain, dict(self.cp.nodes),
                        _tracing(cfg))  # fmt: skip
        return {CDS: list(b.clusters.values()), LDS: list(b.listeners.values())}, b.skipped

    async def StreamAggregatedResources(self, request_iterator, ctx):
        kind, who = await self.caller_of(ctx)
        async with Requests(request_iterator) as requests:
            first = await requests.next()
            if first is None:
                return
            key = first.node.id
            st = self.cp.registry.state
            if key not in st.waypoints:
                await ctx.abort(grpc.StatusCode.NOT_FOUND,
                                f"no waypoint {key!r} (a Gateway of class istio-waypoint; the "
                                "node id is its namespace/name)")  # fmt: skip
            node = await self._node_of(ctx, st, key, kind, who)
            status = self.status[key] = WaypointStatus(key, node)
            _log.info("waypoint connected", fields={
                "waypoint": key, "node": node,
                "as": f"node/{who}" if kind == "node" else _identity(who)})  # fmt: skip
            subscribed: set[str] = set()
            nonces: dict[str, str] = {}
            req = first
            while True:
                if req is not None:
                    self._answer(status, req, subscribed, nonces)
                # send what changed, in order
                state_version = self.cp.version
                res, status.skipped = self._resources(key)
                for t in ORDER:
                    if t not in subscribed:
                        continue
                    version = wpmod.version_of(res[t])
                    if status.sent.get(t) == version:
                        status.sent_for[t] = state_version  # the same for this state too
                        if status.accepted.get(t) == version:
                            status.in_force[t] = state_version
                        continue
                    try:
                        packed = pack(t, res[t])
                    except XdsError as e:
                        _log.error(f"waypoint {key}: {e}; the last configuration stays")
                        continue
                    nonce = uuid.uuid4().hex[:12]
                    nonces[t] = nonce
                    status.sent[t] = version
                    status.sent_for[t] = state_version
                    yield discovery_pb2.DiscoveryResponse(
                        version_info=version, resources=packed, type_url=t, nonce=nonce
                    )
                # Envoy's next request, or a registry change
                req = await requests.next_or(self._changed(self.cp.version))
                if req is None:
                    _log.info("waypoint disconnected", fields={"waypoint": key})
                    return
                if req is Requests.CHANGED:
                    req = None
                    # its node revoked meanwhile, or its pod gone: the stream ends (as a
                    # node's Watch does)
                    await self._node_of(ctx, self.cp.registry.state, key, kind, who)

    async def _node_of(self, ctx, st, key: str, kind: str, who: str) -> str:
        """The node of the waypoint's pod that calls, or the call is refused."""
        pods = st.waypoint_pods(key)
        if kind == "node":
            if who in self.cp.revoked:
                await ctx.abort(grpc.StatusCode.PERMISSION_DENIED, f"node {who} is revoked")
            if not any(w.node == who for w in pods):
                await ctx.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"node {who} runs no pod of waypoint {key}")  # fmt: skip
            return who
        if who != key:
            await ctx.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"identity {_identity(who)} is not waypoint {key}'s "
                            f"({_identity(key)})")  # fmt: skip
        peer = peer_ip(ctx.peer())
        pod = next((w for w in pods if peer and peer in (w.ip, w.ip6)), None)
        if pod is None:
            await ctx.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"{peer or ctx.peer()} is not the address of a pod of waypoint "
                            f"{key}")  # fmt: skip
        if pod.node in self.cp.revoked:  # its certificate came from a node now revoked
            await ctx.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"waypoint {key}'s pod runs on node {pod.node}, which is revoked")  # fmt: skip
        return pod.node

    async def _changed(self, have: int) -> None:
        async with self.cp.changed:
            await self.cp.changed.wait_for(lambda: self.cp.version > have)

    def _answer(self, status: WaypointStatus, req, subscribed: set, nonces: dict) -> None:
        t = req.type_url
        if t not in _MESSAGE:
            _log.warning(f"waypoint {status.key} asked for {t}, which is not served")
            return
        subscribed.add(t)
        if not req.response_nonce or req.response_nonce != nonces.get(t):
            return  # a first request, or an answer to an older response
        if req.HasField("error_detail") and req.error_detail.code:
            version = status.sent.get(t, "")
            status.rejected[t] = (version, req.error_detail.message)  # sent again on a change
            _log.error(
                "waypoint rejected its configuration (NACK); it keeps the last it accepted",
                fields={
                    "waypoint": status.key,
                    "type": t.rsplit(".", 1)[-1],
                    "version": version,
                    "accepted": status.accepted.get(t, ""),
                    "reason": req.error_detail.message[:500],
                },  # fmt: skip
            )
        else:
            status.accepted[t] = req.version_info
            if req.version_info == status.sent.get(t):
                status.in_force[t] = status.sent_for.get(t, 0)
            status.rejected.pop(t, None)
            _log.info("waypoint accepted its configuration", fields={
                "waypoint": status.key, "type": t.rsplit(".", 1)[-1],
                "version": req.version_info})  # fmt: skip


def _identity(key: str) -> str:
    """namespace/name -> ns/<namespace>/sa/<name>: the workload identity's path (a waypoint's
    is its Gateway's namespace and name)."""
    ns, _, name = key.partition("/")
    return f"ns/{ns}/sa/{name}"


def peer_ip(peer: str) -> str:
    """The address of gRPC's peer string: "ipv4:10.0.0.1:5", "ipv6:[fd00::1]:5" (gRPC writes
    the brackets percent-encoded: "ipv6:%5Bfd00::1%5D:5")."""
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return ""


def _tracing(cfg) -> wpmod.Tracing | None:
    """The control plane's --zipkin or --otlp collector, if any."""
    if cfg.zipkin:
        return wpmod.Tracing(cfg.zipkin, cfg.trace_sampling, "zipkin")
    if cfg.otlp:
        return wpmod.Tracing(cfg.otlp, cfg.trace_sampling, "otlp")
    return None
