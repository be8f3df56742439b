"""The agent's API on ``<state_dir>/agent.sock`` (root only), and its metrics.

What the operator's commands read (`dabba status`, `flows`, `workloads`,
`services`, `policies`, `certs`, `policy check`, `config-dump`). The
tunnel serves ``/flows`` on its admin port and merges ``/metrics`` into
15020 from here, so there is one scrape target per node.

Routes (GET, JSON unless noted): /status, /flows (query: see
flowtable.parse_filters), /flows/summary, /workloads, /services,
/policies, /certs, /policy/check (from, to, port), /config_dump,
/metrics (Prometheus text).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import time

from .. import certread, log
from ..bpf import names
from ..control.convert import policy_from_pb, root_of
from ..control.store import private_dir
from ..errors import DabbaError
from ..prom import CounterMetricFamily, GaugeMetricFamily, Registry
from ..ztunnel import admin
from ..ztunnel.policy import Request, evaluate
from . import flowtable

_log = log.get("api")

SOCKET = "agent.sock"
TUNNEL_ADMIN = "http://127.0.0.1:15000"
# dabba_stats counters that mean "a map was full" (plain hash maps: nothing is evicted)
MAP_FULL = {"cap_full": "capture", "tuple_full": "capture_tuple", "flow_full": "flows"}


def _err(status: int, e: Exception | str) -> tuple[int, dict]:
    if isinstance(e, DabbaError):
        return status, {"error": str(e), "hint": e.hint or ""}
    return status, {"error": str(e)}


def _cert_doc(pem: bytes) -> list[dict]:
    out = []
    for c in certread.load_pem(pem):
        out.append(
            {
                "subject": c.subject,
                "serial": format(c.serial, "x"),
                "not_before": c.not_before.isoformat(),
                "not_after": c.not_after.isoformat(),
                "seconds_left": round(
                    (c.not_after - datetime.datetime.now(datetime.UTC)).total_seconds(), 1
                ),
                "sha256": c.sha256,
            }
        )
    return out


class AgentApi:
    def __init__(self, agent):
        self.a = agent
        self.registry = Registry(self, agent.table)
        self.servers: list = []

    # ---- serving ---------------------------------------------------------------------------
    async def start(self) -> None:
        sd = self.a.cfg.state_dir
        private_dir(sd)
        routes = {
            "/status": self.status,
            "/flows": self.flows,
            "/flows/summary": self.summary,
            "/workloads": self.workloads,
            "/services": self.services,
            "/policies": self.policies,
            "/certs": self.certs,
            "/policy/check": self.policy_check,
            "/config_dump": self.config_dump,
            "/metrics": self.metrics,
        }
        self.servers.append(await admin.serve("", 0, routes, unix=os.path.join(sd, SOCKET)))
        facts = os.path.join(sd, "flowfacts.sock")
        self.servers.append(await _serve_facts(facts, self.a.table))
        self._inodes = {n: os.stat(os.path.join(sd, n)).st_ino for n in (SOCKET, "flowfacts.sock")}
        _log.info("agent API listening", fields={"socket": os.path.join(sd, SOCKET)})

    def close(self) -> None:
        for s in self.servers:
            s.close()
        for name, ino in getattr(self, "_inodes", {}).items():
            path = os.path.join(self.a.cfg.state_dir, name)
            try:
                if os.stat(path).st_ino == ino:  # a newer agent's socket is not ours to remove
                    os.unlink(path)
            except OSError:
                pass

    # ---- flows -----------------------------------------------------------------------------
    def _views(self) -> list[dict]:
        a = self.a
        return a.table.live(a.live_records()) + a.table.recent()

    @admin.with_query
    def flows(self, q: dict) -> tuple[int, object]:
        try:
            f = flowtable.parse_filters(q)
        except DabbaError as e:
            return _err(400, e)
        views = flowtable.select(self._views(), f)
        return 200, {"node": self.a.cfg.node, "now": time.time(), "flows": views}

    @admin.with_query
    def summary(self, q: dict) -> tuple[int, object]:
        try:
            f = flowtable.parse_filters(q)
        except DabbaError as e:
            return _err(400, e)
        return 200, {
            "node": self.a.cfg.node,
            "pairs": flowtable.summarize(flowtable.select(self._views(), f)),
        }

    # ---- what the agent holds --------------------------------------------------------------
    def _snap(self):
        return self.a.sync.snapshot if self.a.sync is not None else None

    @admin.with_query
    def workloads(self, q: dict) -> tuple[int, object]:
        snap, a = self._snap(), self.a
        enrolled = set(a.workload_ids.values())
        certs = a.sync.certs if a.sync else {}
        out = []
        if snap is None:  # no control plane: the config's workloads
            for w in a.cfg.workloads:
                key = f"{w.namespace}/{w.name}"
                out.append(
                    {
                        "workload": key,
                        "node": a.cfg.node,
                        "ip": "",
                        "identity": "",
                        "mtls_mode": "STRICT" if w.strict else "",
                        "enrolled": key in enrolled,
                        "cert_seconds_left": None,
                    }
                )
            return 200, {"node": a.cfg.node, "workloads": out}
        for w in snap.workloads:
            if w.node != a.cfg.node and q.get("all") != "1":
                continue
            key = f"{w.namespace}/{w.name}"
            c = certs.get(key)
            out.append(
                {
                    "workload": key,
                    "node": w.node,
                    "ip": w.ip,
                    "ip6": w.ip6,
                    "identity": w.spiffe_id,
                    "mtls_mode": w.mtls_mode,
                    "labels": dict(w.labels),
                    "enrolled": key in enrolled,
                    "cert_seconds_left": round(c.seconds_left, 1) if c else None,
                }
            )
        return 200, {"node": a.cfg.node, "version": snap.version, "workloads": out}

    def services(self) -> tuple[int, object]:
        snap = self._snap()
        ks = self.a.kernel_services
        try:
            held = self.a.ctl.services()  # what connect() resolves, with the endpoints' state
        except OSError:
            held = {}
        out = []
        for s in snap.services if snap else []:
            key = f"{s.namespace}/{s.name}"
            kernel = {p.port: held[(s.vip, p.port)] for p in s.ports if (s.vip, p.port) in held}
            out.append(
                {
                    "service": key,
                    "vip": s.vip,
                    "ports": [{"port": p.port, "target_port": p.target_port} for p in s.ports],
                    "lb_policy": s.lb_policy or "round_robin",
                    "endpoints": list(s.endpoints),
                    "waypoint": s.waypoint,  # opted into: its connections go there
                    "waypoint_pods": list(s.waypoint_pods),
                    "waypoint_refusal": s.waypoint_refusal,  # why none can serve it
                    # who picks the endpoint: the kernel at connect(), or the tunnel (and why)
                    "resolved_by": "kernel" if kernel else "tunnel",
                    "why_tunnel": ""
                    if kernel
                    else (
                        f"the tunnel takes its connections to waypoint {s.waypoint}"
                        if s.waypoint and s.waypoint_pods
                        else ks.left_out.get(key, ks.why_tunnel())
                    ),
                    "kernel": {str(port): v for port, v in kernel.items()},
                }
            )
        return 200, {"node": self.a.cfg.node, "services": out}

    def policies(self) -> tuple[int, object]:
        snap = self._snap()
        out = []
        for p in snap.policies if snap else []:
            d = p.to_dict()
            d["key"] = f"{p.namespace}/{p.name}"
            d["rules_detail"] = d.get("rules", [])
            d["rules"] = len(p.rules)
            out.append(d)
        return 200, {"node": self.a.cfg.node, "policies": out}

    def certs(self) -> tuple[int, object]:
        a = self.a
        if a.sync is None:
            return 200, {"node": a.cfg.node, "workloads": [], "node_cert": None, "roots": []}
        snap = self._snap()
        roots = _cert_doc(snap.trust_bundle_pem) if snap and snap.trust_bundle_pem else []
        return 200, {
            "node": a.cfg.node,
            "workloads": [{"workload": k, **c.as_dict()} for k, c in sorted(a.sync.certs.items())],
            "node_cert": a.sync.node_cert.as_dict() if a.sync.node_cert else None,
            "roots": roots,
        }

    @admin.with_query
    def policy_check(self, q: dict) -> tuple[int, object]:
        """The decision the tunnel would take, by the tunnel's own code (policy.evaluate)."""
        snap = self._snap()
        if snap is None:
            return _err(503, "the agent has no snapshot from the control plane yet")
        try:
            port = int(q.get("port", ""))
            if not 1 <= port <= 65535:
                raise ValueError
        except ValueError:
            return _err(400, f"--port {q.get('port', '')!r} is not a port (1..65535)")
        by_key = {f"{w.namespace}/{w.name}": w for w in snap.workloads}

        def find(what: str, text: str):
            if text in by_key:
                return by_key[text]
            hits = [w for k, w in by_key.items() if k.split("/", 1)[1] == text]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                names = ", ".join(f"{w.namespace}/{w.name}" for w in hits)
                raise DabbaError(
                    f"{what} {text!r} is ambiguous: {names}", hint="use namespace/name"
                )
            raise DabbaError(
                f"{what}: no workload {text!r} in this node's snapshot",
                hint="`dabba workloads --all` lists them",
            )

        try:
            src = find("--from", q.get("from", ""))
            dst = find("--to", q.get("to", ""))
        except DabbaError as e:
            return _err(404, e)
        if dst.node != self.a.cfg.node:
            return _err(
                400,
                DabbaError(
                    f"--to {dst.namespace}/{dst.name} runs on node {dst.node}: its tunnel decides, "
                    f"and this node holds only the policies of its own workloads",
                    hint=f"run `dabba policy check` on {dst.node}",
                ),
            )
        from ..ztunnel.tunnel import _model

        policies = [policy_from_pb(p, root_of(snap)) for p in snap.policies]
        d = evaluate(policies, _model(dst), Request(src.ip, dst.ip, port, src.spiffe_id))
        return 200, {
            "from": {"workload": f"{src.namespace}/{src.name}", "identity": src.spiffe_id},
            "to": {"workload": f"{dst.namespace}/{dst.name}", "ip": dst.ip, "port": port},
            "verdict": d.verdict,
            "reason": d.reason,
            "policy": d.policy,
            "rule": d.rule,
            "origin": d.origin,
            "mtls_mode": dst.mtls_mode,
            "version": snap.version,
        }

    # ---- status ----------------------------------------------------------------------------
    def status(self) -> tuple[int, object]:
        a = self.a
        problems, warnings = [], []
        dp = a.dp.status()
        if not dp.healthy():
            problems.append("datapath: a program is missing or not attached exactly once")
        if a.cfg.control is not None and a.tunnel_ready():
            why = {
                names.PROG_OWN: "the tunnel's ports are not held for its own sockets",
                names.PROG_TUN_OPS: "the tunnel's connections are not recognised: STRICT and "
                "PERMISSIVE workloads refuse its deliveries",
            }
            problems += [
                f"datapath: {p.name} is not attached: {why[p.name]} (see the agent's log)"
                for p in dp.programs
                if p.name in why and p.attached != 1
            ]
        refused, how = a.packet_sockets
        cap = a.cfg.capture
        if not refused and cap.enabled and cap.non_tcp != "pass":
            warnings.append(
                f"workloads' packet sockets are not refused: {how} (capture.packet_sockets: "
                "refuse-where-able): a workload holding CAP_NET_RAW can send frames around the mesh"
            )
        fills = {m.name: m.fill for m in dp.maps if m.fill is not None}
        for name, fill in fills.items():
            if fill > 0.9:
                warnings.append(f"map {name} is {fill:.0%} full")
        ctl = a.sync.status() if a.sync else None
        if ctl is not None and not ctl["connected"]:
            warnings.append(
                f"control plane {ctl['address']} unreachable"
                + (f" for {ctl['staleness_s']:.0f}s" if ctl["staleness_s"] else "")
                + f" (last error: {ctl['last_error']}); serving the last good snapshot"
            )
            if not ctl["config_version"]:
                problems.append("no snapshot from the control plane yet")
        tun = {
            "supervised": a.cfg.tunnel.run,
            "ready": a.tunnel_ready(),
            "pid": a.tunnel_proc.pid if a.tunnel_proc else None,
            "restarts": a.tunnel_restarts,
            "upgrades": a.tunnel_upgrades,
            "workers": a.cfg.tunnel.workers,
        }
        if a.cfg.tunnel.run and not tun["ready"]:
            problems.append("tunnel not ready: captured connections fail closed")
        soonest = None
        if a.sync is not None:
            for k, c in a.sync.certs.items():
                if soonest is None or c.seconds_left < soonest[1]:
                    soonest = (k, c.seconds_left)
            if soonest and soonest[1] <= 0:
                problems.append(f"certificate of {soonest[0]} expired")
        st = a.ctl.stats()
        same = a.same_node.status()
        if same["kernel_lacks"]:
            warnings.append(f"same-node connections go through the tunnel: {same['kernel_lacks']}")
        ks = a.kernel_services
        return 200, {
            "node": a.cfg.node,
            "same_node": same,
            "kernel_services": {
                "service_ports": len(ks.services or {}),
                "left_out": ks.left_out,
                "why_tunnel": ks.why_tunnel(),
            },
            "healthy": not problems,
            "problems": problems,
            "warnings": warnings,
            "agent": {"pid": os.getpid(), "uptime_s": round(time.time() - a.started, 1)},
            "datapath": {
                "pins": dp.pin_root,
                "cgroup": dp.cgroup,
                "programs": [
                    {
                        "name": p.name,
                        "hook": p.hook,
                        "id": p.id,
                        "attached": p.attached,
                        "elsewhere": p.elsewhere,
                        "pinned": p.pinned,
                        "optional": p.optional,
                    }
                    for p in dp.programs
                ],
                "maps": {m.name: {"entries": m.entries, "max": m.max_entries} for m in dp.maps},
                "counters": st,
                "packet_sockets": {"refused": refused, "detail": how},
            },
            "control": ctl and {k: v for k, v in ctl.items() if k != "certs"},
            "tunnel": tun,
            "workloads": {
                "enrolled": len(a.workload_ids),
                # pods of waypoints here: Envoy, HBONE in and out itself, not captured
                "waypoint_pods": sorted(a._waypoint_pods),
            },
            "certificates": {
                "count": len(a.sync.certs) if a.sync else 0,
                "soonest": {"workload": soonest[0], "seconds_left": round(soonest[1], 1)}
                if soonest
                else None,
            },
            "flows": {
                # the kernel's own count (table.seen only knows flows someone has listed)
                "live": next((m.entries for m in dp.maps if m.name == names.MAP_FLOWS), None),
                "closed_kept": len(a.table.closed),
                "closed_total": a.table.closed_total,
                "facts_received": a.table.facts_received,
                # the tunnel's facts of flows whose kernel record has not closed yet
                "facts_waiting": len(a.table.facts),
            },
        }

    async def config_dump(self) -> tuple[int, object]:
        a = self.a
        snap = self._snap()
        doc = {
            "agent": {"config": a.cfg.dump(), "workloads": a.workload_ids},
            "snapshot": snap.to_dict() if snap else None,
        }
        if snap is not None:
            doc["snapshot"].pop("trust_bundle_pem", None)  # public, but long: see `dabba certs`
        try:
            doc["tunnel"] = await asyncio.wait_for(_http_get_json(TUNNEL_ADMIN + "/config_dump"), 3)
        except (OSError, TimeoutError, ValueError) as e:
            doc["tunnel"] = {"error": f"the tunnel's admin API did not answer: {e}"}
        return 200, doc

    def metrics(self) -> tuple[int, str]:
        return 200, self.registry.text()

    # ---- the agent's own metrics -----------------------------------------------------------
    def collect(self):
        a = self.a
        st = a.ctl.stats()
        drops = CounterMetricFamily(
            "dabba_drops", "Connections or packets dropped, by reason", labels=["reason"]
        )
        drops.add_metric(["ingress_guard"], st.get("guard_drop", 0))
        drops.add_metric(["plaintext_no_tunnel"], st.get("plain_no_tunnel", 0))
        # refused in the kernel: connect() to the node, link-local or a mesh port; native IPv6;
        # non-TCP other than DNS; packet and other non-IP sockets; IPv6 plaintext to a
        # PERMISSIVE workload
        drops.add_metric(["destination"], st.get("dst_refused", 0))
        drops.add_metric(["ipv6"], st.get("v6_refused", 0))
        drops.add_metric(["protocol"], st.get("proto_refused", 0))
        drops.add_metric(["socket_family"], st.get("family_refused", 0))
        drops.add_metric(["connection_limit"], st.get("limit_refused", 0))
        drops.add_metric(["plaintext_ipv6"], st.get("plain_v6_drop", 0))
        # denied by policy: by a tunnel, and by a same-node verdict in the kernel
        drops.add_metric(["policy"], a.table.denied + st.get("policy_refused", 0))
        yield drops
        full = CounterMetricFamily(
            "dabba_bpf_map_full",
            "Inserts refused because a map was full (the maps are not LRU: nothing is evicted)",
            labels=["map"],
        )
        for k, name in MAP_FULL.items():
            full.add_metric([name], st.get(k, 0))
        full.add_metric(["flow_events"], st.get("ring_drop", 0))
        yield full
        ent = GaugeMetricFamily("dabba_bpf_map_entries", "Entries in a map", labels=["map"])
        cap = GaugeMetricFamily("dabba_bpf_map_max_entries", "Capacity of a map", labels=["map"])
        for m in a.dp.status().maps:
            if m.entries is not None:
                ent.add_metric([m.name], m.entries)
                cap.add_metric([m.name], m.max_entries)
        yield ent
        yield cap
        yield CounterMetricFamily(
            "dabba_captured_connections",
            "Connections captured to the tunnel",
            st.get("captured", 0),
        )
        yield CounterMetricFamily(
            "dabba_flows_closed", "Flows closed (kernel records)", a.table.closed_total
        )
        exp = GaugeMetricFamily(
            "dabba_certificate_expiry_timestamp_seconds",
            "When a workload's certificate expires (Unix time); alert on (this - time())",
            labels=["workload", "namespace", "identity"],
        )
        ctl = GaugeMetricFamily("dabba_control_connected", "1 while the control stream is up")
        stale = GaugeMetricFamily(
            "dabba_control_staleness_seconds", "Seconds since the control plane was last heard"
        )
        version = GaugeMetricFamily("dabba_config_version", "Snapshot version the agent holds")
        if a.sync is not None:
            for k, c in a.sync.certs.items():
                ns, name = k.split("/", 1)
                exp.add_metric([name, ns, c.spiffe_id], c.not_after.timestamp())
            if a.sync.node_cert is not None:
                exp.add_metric(
                    ["node", "", a.sync.node_cert.spiffe_id], a.sync.node_cert.not_after.timestamp()
                )
            s = a.sync.status()
            ctl.add_metric([], 1 if s["connected"] else 0)
            if s["last_contact"]:
                stale.add_metric([], time.time() - s["last_contact"])
            version.add_metric([], s["config_version"])
        yield exp
        yield ctl
        yield stale
        yield version
        up = GaugeMetricFamily("dabba_tunnel_up", "1 while the node's tunnel is ready")
        up.add_metric([], 1 if a.tunnel_ready() else 0)
        yield up
        yield GaugeMetricFamily(
            "dabba_workloads_enrolled", "Workloads enrolled", len(a.workload_ids)
        )
        yield GaugeMetricFamily("dabba_agent_up", "The agent answers (1)", 1)


async def _serve_facts(path: str, table) -> asyncio.base_events.Server:
    """The tunnel's flow facts: JSON lines on a Unix stream socket (root only)."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while line := await r.readline():
                try:
                    table.add_fact(json.loads(line))
                except (ValueError, KeyError, TypeError) as e:
                    _log.warning(f"malformed flow fact ignored: {e}")
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            w.close()

    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    old = os.umask(0o077)
    try:
        return await asyncio.start_unix_server(handle, path, limit=1 << 20)
    finally:
        os.umask(old)


async def _http_get_json(url: str) -> object:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    _, body = await admin.get(u.hostname, u.port, u.path)
    return json.loads(body)
