"""`dabba control serve`: the CA, the registry and the per-node stream, over gRPC (grpc.aio).

Two listeners (see proto/control.proto):
- join (default :15013): server-authenticated TLS; Join with a one-time token;
- control (default :15012): mutual TLS; the node's certificate names it
  (spiffe://<td>/node/<name>), and every call is authorized for that node.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import time
from dataclasses import dataclass, field

import grpc
from cryptography import x509

from .. import log, systemd
from ..errors import DabbaError
from . import ca as camod
from . import model as m
from . import validate
from .attest import looks_like_jwt
from .convert import policy_to_pb
from .proto import control_pb2 as pb
from .proto import control_pb2_grpc as pbg
from .registry import FileRegistry
from .revocation import RevokedNodes, revoked_serials
from .store import append_record, atomic_write, load_records
from .tokens import TokenError, TokenStore

_log = log.get("control")

DEFAULT_NODE_TTL = datetime.timedelta(days=7)


@dataclass
class ControlConfig:
    """Everything `dabba control serve` takes (flags of the same names)."""

    state_dir: str
    registry_dir: str
    trust_domain: str = "cluster.local"
    listen: str = "0.0.0.0:15012"
    join_listen: str = "0.0.0.0:15013"
    server_names: list[str] = field(
        default_factory=list
    )  # DNS names / IPs in the serving certificate
    workload_ttl: datetime.timedelta = camod.DEFAULT_WORKLOAD_TTL
    node_ttl: datetime.timedelta = DEFAULT_NODE_TTL
    plugin_ca_dir: str | None = None
    registry_poll_s: float = 0.5
    source: str = "files"  # files | kubernetes
    kubeconfig: str | None = None  # kubernetes: None means in-cluster
    health_listen: str = ""  # HOST:PORT of /healthz/ready and /healthz/live (probes); "" = none
    root_namespace: str = m.ROOT_NAMESPACE  # its policies are mesh-wide (Istio's rootNamespace)
    kube_list_s: float = 5.0  # --source kubernetes: seconds between lists
    # nodes may also join with their agent pod's ServiceAccount token (attest.py): "" = no,
    # else the agent's ServiceAccount as NAMESPACE/NAME (Kubernetes)
    join_service_account: str = ""
    zipkin: str = ""  # IP:PORT of a Zipkin collector for waypoints' spans; "" = no tracing
    otlp: str = ""  # or IP:PORT of an OpenTelemetry collector (OTLP over gRPC)
    trace_sampling: float = 1.0  # percent of requests traced


class ControlPlane:
    """The state behind both services; the one writer of nodes and issued serials."""

    def __init__(self, cfg: ControlConfig):
        self.cfg = cfg
        os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
        self.ca = camod.CA.load_or_create(
            cfg.state_dir, cfg.trust_domain, cfg.plugin_ca_dir, cfg.workload_ttl
        )
        self.tokens = TokenStore(cfg.state_dir)
        self.revoked = RevokedNodes(cfg.state_dir)
        self.attestor = None
        if cfg.join_service_account:
            from .attest import KubeAttestor

            self.attestor = KubeAttestor(cfg.join_service_account, cfg.kubeconfig)
        self.nodes_path = os.path.join(cfg.state_dir, "nodes.json")
        self.serials_path = os.path.join(cfg.state_dir, "serials.log")
        self.nodes: dict[str, str] = _load_json(self.nodes_path)
        if cfg.source == "kubernetes":
            from .kube import KubeSource

            self.registry = KubeSource(
                kubeconfig=cfg.kubeconfig,
                interval=cfg.kube_list_s,
                on_change=self._registry_changed,
                root=cfg.root_namespace,
            )
        else:
            self.registry = FileRegistry(
                cfg.registry_dir, self._registry_changed, cfg.registry_poll_s, cfg.root_namespace
            )
        self.loop: asyncio.AbstractEventLoop | None = None
        self.changed: asyncio.Condition | None = None
        # Versions only grow, across restarts too: start from the clock (ms), then count changes.
        self.version = int(time.time() * 1000)
        self.issued = len(load_records(self.serials_path))
        self.ads = None  # the waypoints' ADS (xds/ads.py), once serving

    def _revoked_serials(self) -> list[str]:
        """revocation.revoked_serials, read again only when the revoked nodes, the issued
        certificates or the minute changed (every snapshot of every node asks)."""
        key = (self.revoked.stamp, self.issued, int(time.time() // 60))
        if getattr(self, "_revoked_key", None) != key:
            self._revoked_key = key
            self._revoked_list = revoked_serials(self.serials_path, self.revoked)
        return self._revoked_list

    def status(self) -> dict:
        """What `dabba control status` and /status show."""
        from .registry import source_status

        return {
            "trust_domain": self.cfg.trust_domain,
            "root_namespace": self.cfg.root_namespace,
            "nodes": sorted(self.nodes),
            "revoked_nodes": sorted(self.revoked.nodes),
            "certificates_issued": self.issued,
            "snapshot_version": self.version,
            "registry": source_status(self.registry),
            "waypoints": self._waypoints(),
        }

    def _waypoints(self) -> list[dict]:
        """Each waypoint (Gateway) and what its Envoy runs, as its ADS stream said."""
        st = self.registry.state
        seen = self.ads.status if self.ads is not None else {}
        out = []
        for key in sorted(st.waypoints):
            d = {"waypoint": key, "pods": [w.key for w in st.waypoint_pods(key)],
                 "services": sorted(s.key for s in st.services.values()
                                    if st.waypoint_of(s) == key)}  # fmt: skip
            if key in seen:
                d.update(seen[key].doc())
            out.append(d)
        return out

    # -- change notification --
    def _registry_changed(self, state: m.State) -> None:
        if self.loop:
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._bump()))

    async def _bump(self) -> None:
        async with self.changed:
            self.version += 1
            self.changed.notify_all()

    # -- nodes --
    def record_node(self, node: str, address: str) -> None:
        if self.nodes.get(node) != address:
            self.nodes[node] = address
            import json

            atomic_write(self.nodes_path, json.dumps(self.nodes, indent=1).encode(), mode=0o600)
            if self.loop:
                asyncio.ensure_future(self._bump())

    def record_issue(self, issued: camod.Issued, identity: str, node: str) -> None:
        append_record(
            self.serials_path,
            {
                "serial": format(issued.serial, "x"),
                "identity": identity,
                "node": node,
                "not_after": int(issued.not_after.timestamp()),
            },
        )
        self.issued += 1

    # -- what a node gets --
    def snapshot_for(self, node: str) -> pb.Snapshot:
        st = self.registry.state
        td = self.cfg.trust_domain
        local = {w.key for w in st.workloads_on(node)}
        snap = pb.Snapshot(
            version=self.version,
            trust_domain=td,
            trust_bundle_pem=self.ca.bundle_pem(),
            signing_root=camod.fingerprint(self.ca.signing_root()),
            root_namespace=self.cfg.root_namespace,
            revoked_serials=self._revoked_serials(),
        )
        for w in sorted(st.workloads.values(), key=lambda w: w.key):
            pw = pb.Workload(
                name=w.name,
                namespace=w.namespace,
                service_account=w.service_account,
                node=w.node,
                ip=w.ip,
                ip6=w.ip6,
                labels=w.labels,
                spiffe_id=w.spiffe(td),
                mtls_mode=st.peer_mode(w),
                waypoint=st.waypoint_of_pod(w),
            )
            for pa in st.peerauth.values():
                if pa.applies_to(w):
                    for port in pa.port_modes:
                        pw.port_mtls[port] = st.peer_mode(w, port)
            if w.key in local:
                pw.cgroup = w.cgroup
                pw.netns = w.netns
                pw.pod_uid = w.pod_uid
            snap.workloads.append(pw)
        for s in sorted(st.services.values(), key=lambda s: s.key):
            waypoint = st.waypoint_of(s)
            pods, refusal = st.waypoint_serving(waypoint) if waypoint else ([], "")
            snap.services.append(
                pb.Service(
                    name=s.name,
                    namespace=s.namespace,
                    vip=s.vip,
                    lb_policy=s.lb_policy,
                    ports=[
                        pb.ServicePort(port=p.port, target_port=p.target_port, name=p.name)
                        for p in s.ports
                    ],
                    # its traffic passes through its waypoint: no endpoint here, so the kernel
                    # hands it to the tunnel (or refuses it, saying why, when no waypoint pod
                    # can serve it)
                    endpoints=[] if waypoint else [w.key for w in st.endpoints(s)],
                    waypoint=waypoint,
                    waypoint_pods=[w.key for w in pods],
                    waypoint_refusal=refusal,
                )
            )
        for name, addr in sorted(self.nodes.items()):
            if name not in self.revoked:  # no flow is sent to a revoked node
                snap.nodes.append(pb.Node(name=name, address=addr))
        mine = [w for w in st.workloads.values() if w.key in local]
        for p in sorted(st.authz.values(), key=lambda p: p.key):
            if any(p.applies_to(w) for w in mine):
                snap.policies.append(policy_to_pb(p))
        return snap


class _Malformed:
    """Stands in for a request that did not parse; the handler answers INVALID_ARGUMENT."""

    def __init__(self, type_name: str, error: Exception):
        self.type_name, self.error = type_name, error


def _safe_handlers(servicer, service) -> grpc.GenericRpcHandler:
    """Method handlers like the generated add_*_to_server, but a request that does not
    parse gets INVALID_ARGUMENT naming its type, instead of UNKNOWN and a traceback."""
    handlers = {}
    for method in service.methods:
        req_cls = getattr(pb, method.input_type.name)
        resp_cls = getattr(pb, method.output_type.name)
        impl = getattr(servicer, method.name)

        def deserialize(data: bytes, req_cls=req_cls):
            try:
                return req_cls.FromString(data)
            except Exception as e:  # protobuf's DecodeError and friends
                return _Malformed(req_cls.DESCRIPTOR.full_name, e)

        if method.server_streaming:

            async def call(req, ctx, impl=impl):
                if isinstance(req, _Malformed):
                    await ctx.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"malformed {req.type_name}: {req.error}"
                    )
                async for item in impl(req, ctx):
                    yield item

            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                call,
                request_deserializer=deserialize,
                response_serializer=resp_cls.SerializeToString,
            )
        else:

            async def call(req, ctx, impl=impl):
                if isinstance(req, _Malformed):
                    _log.warning(
                        "malformed request", fields={"type": req.type_name, "peer": ctx.peer()}
                    )
                    await ctx.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"malformed {req.type_name}: {req.error}"
                    )
                return await impl(req, ctx)

            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                call,
                request_deserializer=deserialize,
                response_serializer=resp_cls.SerializeToString,
            )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _load_json(path: str) -> dict:
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def _ts(d: datetime.datetime) -> int:
    return int(d.timestamp())


class JoinService(pbg.JoinServicer):
    def __init__(self, cp: ControlPlane):
        self.cp = cp

    async def Join(self, req: pb.JoinRequest, ctx: grpc.aio.ServicerContext) -> pb.NodeCertificate:
        peer = ctx.peer()
        err = validate.node_error(req.node)
        if err:
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid {err}")
        await _refuse_revoked(self.cp, req.node, ctx)
        # the token is burned only by a join that succeeds: checked, then the CSR, then used
        uri = camod.node_spiffe_id(self.cp.cfg.trust_domain, req.node)
        try:
            if self.cp.attestor is not None and looks_like_jwt(req.token):
                # Kubernetes: the agent pod's ServiceAccount token, bound to a pod on req.node
                await asyncio.to_thread(self.cp.attestor.check, req.token, req.node)
                csr = camod.validate_csr(req.csr_pem, uri)
            else:
                self.cp.tokens.check(req.token, req.node)
                csr = camod.validate_csr(req.csr_pem, uri)
                self.cp.tokens.consume(req.token, req.node)
        except TokenError as e:
            _log.warning("join refused", fields={"node": req.node, "peer": peer, "reason": str(e)})
            await ctx.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        except camod.CSRError as e:
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node CSR: {e}")
        issued = self.cp.ca.issue_validated(csr, uri, self.cp.cfg.node_ttl)
        self.cp.record_issue(issued, uri, req.node)
        if req.address:
            self.cp.record_node(req.node, req.address)
        _log.info(
            "node joined",
            fields={"node": req.node, "peer": peer, "serial": format(issued.serial, "x")},
        )
        return pb.NodeCertificate(
            cert_chain_pem=issued.chain_pem,
            trust_bundle_pem=self.cp.ca.bundle_pem(),
            trust_domain=self.cp.cfg.trust_domain,
            not_after_unix=_ts(issued.not_after),
        )


class ControlService(pbg.ControlServicer):
    def __init__(self, cp: ControlPlane):
        self.cp = cp
        self.prefix = f"spiffe://{cp.cfg.trust_domain}/node/"

    async def _ids(self, ctx) -> list[str]:
        """The SPIFFE IDs of the caller's (already verified) client certificate."""
        pem = (ctx.auth_context().get("x509_pem_cert") or [b""])[0]
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            await ctx.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        return camod.spiffe_ids_of(cert)

    async def _node(self, ctx) -> str:
        """The calling node, from its (already verified) client certificate."""
        ids = [u for u in await self._ids(ctx) if u.startswith(self.prefix)]
        if len(ids) != 1:
            await ctx.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "the client certificate is not a node certificate",
            )
        node = ids[0][len(self.prefix) :]
        await _refuse_revoked(self.cp, node, ctx)
        return node

    async def _caller(self, ctx) -> tuple[str, str]:
        """("node", name) for a node's certificate, ("workload", "namespace/service account")
        for a workload's (a waypoint's own, on its ADS stream); anything else is refused."""
        ids = await self._ids(ctx)
        if any(u.startswith(self.prefix) for u in ids):
            return "node", await self._node(ctx)
        ident = validate.workload_identity(ids[0], self.cp.cfg.trust_domain) if ids else None
        if len(ids) != 1 or ident is None:
            await ctx.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "the client certificate is neither a node's nor a workload's",
            )
        return "workload", "/".join(ident)

    async def SignWorkload(self, req: pb.SignWorkloadRequest, ctx) -> pb.WorkloadCertificate:
        node = await self._node(ctx)
        key = f"{req.namespace}/{req.name}"
        w = self.cp.registry.state.workloads.get(key)
        if w is None:
            await ctx.abort(grpc.StatusCode.NOT_FOUND, f"no workload {key} in the registry")
        uri = w.spiffe(self.cp.cfg.trust_domain)
        if w.node != node:
            _log.warning(
                "certificate refused: workload is not scheduled on the calling node",
                fields={"node": node, "identity": uri, "workload": key, "scheduled_on": w.node},
            )
            await ctx.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {node} may not obtain {uri}: workload {key} is scheduled on {w.node}",
            )
        try:
            issued = self.cp.ca.issue(req.csr_pem, uri)
        except camod.CSRError as e:
            _log.warning("CSR refused", fields={"node": node, "identity": uri, "reason": str(e)})
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"CSR for {uri}: {e}")
        self.cp.record_issue(issued, uri, node)
        return pb.WorkloadCertificate(
            spiffe_id=uri,
            cert_chain_pem=issued.chain_pem,
            trust_bundle_pem=self.cp.ca.bundle_pem(),
            not_after_unix=_ts(issued.not_after),
            serial=format(issued.serial, "x"),
        )

    async def RenewNode(self, req: pb.RenewNodeRequest, ctx) -> pb.NodeCertificate:
        node = await self._node(ctx)
        uri = camod.node_spiffe_id(self.cp.cfg.trust_domain, node)
        try:
            issued = self.cp.ca.issue(req.csr_pem, uri, self.cp.cfg.node_ttl)
        except camod.CSRError as e:
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node CSR: {e}")
        self.cp.record_issue(issued, uri, node)
        return pb.NodeCertificate(
            cert_chain_pem=issued.chain_pem,
            trust_bundle_pem=self.cp.ca.bundle_pem(),
            trust_domain=self.cp.cfg.trust_domain,
            not_after_unix=_ts(issued.not_after),
        )

    async def Watch(self, req: pb.WatchRequest, ctx):
        node = await self._node(ctx)
        _log.info("node watching", fields={"node": node, "have": req.have_version})
        # A snapshot first, whatever the node has (it may come from before a restart of
        # either side), then a new one on every change.
        snap = self.cp.snapshot_for(node)
        sent = snap.version
        yield snap
        while True:
            async with self.cp.changed:
                await self.cp.changed.wait_for(lambda have=sent: self.cp.version > have)
            await _refuse_revoked(self.cp, node, ctx)  # revoked meanwhile: the stream ends
            snap = self.cp.snapshot_for(node)
            sent = snap.version
            yield snap


async def _refuse_revoked(cp: ControlPlane, node: str, ctx) -> None:
    if node in cp.revoked:
        _log.warning("revoked node refused", fields={"node": node, "peer": ctx.peer()})
        await ctx.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"node {node} is revoked (dabba control node unrevoke {node} lifts it)",
        )


class ControlServer:
    """Both listeners around one ControlPlane; start() binds, the bound ports are then known."""

    def __init__(self, cfg: ControlConfig):
        self.cfg = cfg
        self.cp = ControlPlane(cfg)
        self.control_port = self.join_port = 0
        self._servers: list[grpc.aio.Server] = []

    async def start(self) -> None:
        cp, cfg = self.cp, self.cfg
        cp.loop = asyncio.get_running_loop()
        cp.changed = asyncio.Condition()
        names = cfg.server_names or ["localhost", "127.0.0.1"]
        issued, key = cp.ca.issue_server(
            f"spiffe://{cfg.trust_domain}/control", names, datetime.timedelta(days=365)
        )
        pair = [(key, issued.chain_pem)]

        def mtls_config():
            # read per handshake: a root rotation reaches new connections at once
            return grpc.ssl_server_certificate_configuration(
                pair, root_certificates=cp.ca.bundle_pem()
            )

        opts = [("grpc.max_receive_message_length", 1 << 20)]
        control = grpc.aio.server(options=opts)
        service = ControlService(cp)
        control.add_generic_rpc_handlers(
            (_safe_handlers(service, pb.DESCRIPTOR.services_by_name["Control"]),)
        )
        from .xds import ads  # waypoints' Envoy (xds-protos): imported when serving only

        cp.ads = ads.Ads(cp, service._caller)
        ads.ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(cp.ads, control)
        join = grpc.aio.server(options=opts)
        join.add_generic_rpc_handlers(
            (_safe_handlers(JoinService(cp), pb.DESCRIPTOR.services_by_name["Join"]),)
        )
        try:
            self.control_port = control.add_secure_port(
                cfg.listen, grpc.dynamic_ssl_server_credentials(mtls_config(), mtls_config, True)
            )
            self.join_port = join.add_secure_port(
                cfg.join_listen, grpc.ssl_server_credentials(pair)
            )
        except RuntimeError as e:
            raise DabbaError(
                f"cannot listen on {cfg.listen} / {cfg.join_listen}: {e}",
                hint="is another control plane running, or is the address not on this host?",
            ) from None
        await control.start()
        await join.start()
        self._servers = [control, join]
        cp.registry.start()
        self._ca_watch = asyncio.ensure_future(self._watch_ca())
        _log.info(
            "control plane serving",
            fields={
                "control": cfg.listen,
                "join": cfg.join_listen,
                "trust_domain": cfg.trust_domain,
                "ca": cp.ca.mode,
                "registry_version": cp.version,
            },
        )

    def _ca_stamp(self):
        d = self.cp.ca.dir
        out = []
        for f in ("bundle.pem", "signing-cert.pem"):
            try:
                out.append(os.stat(os.path.join(d, f)).st_mtime_ns)
            except FileNotFoundError:
                out.append(0)
        return out

    async def _watch_ca(self) -> None:
        """`dabba control ca rotate|retire` change the CA files: load them and tell every node."""
        stamp = self._ca_stamp()
        while True:
            await asyncio.sleep(self.cfg.registry_poll_s)
            try:
                if self.cp.revoked.reload():  # `dabba control node revoke`: tell every node
                    _log.warning("revoked nodes", fields={"nodes": sorted(self.cp.revoked.nodes)})
                    await self.cp._bump()
            except DabbaError as e:
                _log.error(f"revoked nodes not reloaded, keeping the last: {e}")
            if self.cp.ca.maybe_activate():  # phase 2 of a root rotation
                await self.cp._bump()
                stamp = self._ca_stamp()
                continue
            now = self._ca_stamp()
            if now == stamp:
                continue
            stamp = now
            try:
                self.cp.ca = camod.CA.load_or_create(
                    self.cfg.state_dir,
                    self.cfg.trust_domain,
                    self.cfg.plugin_ca_dir,
                    self.cfg.workload_ttl,
                )
            except DabbaError as e:
                _log.error(f"CA files changed but cannot be loaded, keeping the current CA: {e}")
                continue
            _log.info(
                "CA reloaded",
                fields={
                    "roots": len(self.cp.ca.roots),
                    "signing": camod.fingerprint(self.cp.ca.cert),
                },
            )
            await self.cp._bump()

    async def stop(self) -> None:
        if getattr(self, "_ca_watch", None):
            self._ca_watch.cancel()
        self.cp.registry.stop()
        for s in self._servers:
            await s.stop(1)


def _metrics(st: dict) -> str:
    """The control plane's registry source, in Prometheus' text format."""
    src = st["registry"]
    failing = src["failing_since"]
    return (
        "# HELP dabba_control_registry_version The registry version the control plane serves.\n"
        "# TYPE dabba_control_registry_version gauge\n"
        f"dabba_control_registry_version {src['version']}\n"
        "# HELP dabba_control_registry_failures_total Registry changes or lists that failed "
        "(the last good state stayed in force).\n"
        "# TYPE dabba_control_registry_failures_total counter\n"
        f'dabba_control_registry_failures_total{{source="{src["source"]}"}} {src["failures"]}\n'
        "# HELP dabba_control_registry_failing 1 while the source fails (the last good state "
        "is served), else 0.\n"
        "# TYPE dabba_control_registry_failing gauge\n"
        f"dabba_control_registry_failing {1 if failing else 0}\n"
        "# HELP dabba_control_registry_stale_seconds How long the source has been failing "
        "(0: its last change or list succeeded).\n"
        "# TYPE dabba_control_registry_stale_seconds gauge\n"
        f"dabba_control_registry_stale_seconds {time.time() - failing if failing else 0:.1f}\n"
    )


async def _write_status(cp: ControlPlane, every: float) -> None:
    """<state>/status.json (0640) for `dabba control status`, whenever it changes."""
    import json

    path = os.path.join(cp.cfg.state_dir, "status.json")
    last = None
    while True:
        st = cp.status()
        text = json.dumps(st, indent=1, sort_keys=True)
        if text != last:
            atomic_write(path, text.encode(), mode=0o640)
            last = text
            if st["registry"]["last_error"]:
                systemd.notify(
                    f"STATUS=registry failing: {st['registry']['last_error'][:200]}; serving "
                    f"version {st['registry']['version']}"
                )
        await asyncio.sleep(max(every, 0.5))


async def serve(cfg: ControlConfig, stop: asyncio.Event | None = None) -> None:
    """Run both listeners until stop is set (or forever); tell systemd when serving."""
    from ..ztunnel import admin

    srv = ControlServer(cfg)
    await srv.start()
    extra = []
    status_task = asyncio.ensure_future(_write_status(srv.cp, cfg.registry_poll_s))
    if cfg.health_listen:
        host, _, port = cfg.health_listen.rpartition(":")

        def ready():
            return (200, "ready\n") if srv._servers else (503, "not serving\n")

        routes = {
            "/healthz/ready": ready,
            "/healthz/live": ready,
            "/status": lambda: (200, srv.cp.status()),
            "/metrics": lambda: (200, _metrics(srv.cp.status())),
        }
        try:
            extra.append(await admin.serve(host, int(port), routes))
        except OSError as e:
            await srv.stop()
            raise DabbaError(f"--health-listen {cfg.health_listen}: {e.strerror}") from None
    dog = asyncio.ensure_future(systemd.watchdog(lambda: None))  # the loop turning is the proof
    systemd.notify(
        "READY=1",
        f"STATUS=serving nodes on {cfg.listen}, joins on {cfg.join_listen}, "
        f"registry version {srv.cp.version}",
    )
    try:
        await (stop.wait() if stop else asyncio.Event().wait())
    finally:
        systemd.notify("STOPPING=1")
        dog.cancel()
        status_task.cancel()
        for x in extra:
            x.close()
        await srv.stop()
