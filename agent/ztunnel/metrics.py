"""The tunnel's Prometheus metrics (15020 /metrics).

Istio's L4 connection counters with Istio's names and labels, counted by the
tunnel as it opens and closes flows (byte counters come from the kernel's
flow records, joined by the agent: the flows issue), plus ``dabba_tunnel_*``
for what only the tunnel knows. Labels are bounded: workloads, namespaces,
identities and services, never ports or addresses.
"""

from __future__ import annotations

from collections import Counter

from ..prom import CounterMetricFamily, GaugeMetricFamily, Registry, merge

ISTIO_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_app",
    "destination_version",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)


def istio_labels(reporter, src, dst, svc, security: str, flags: str = "-") -> tuple:
    """Label values for a flow; src/dst are control-plane Workload messages (or None)."""

    def w(x, attr, default="unknown"):
        return (getattr(x, attr, "") or default) if x is not None else default

    def lbl(x, key):
        return x.labels.get(key, "unknown") if x is not None else "unknown"

    return (
        reporter,
        w(src, "name"),
        w(src, "namespace"),
        w(src, "spiffe_id"),  # spiffe://..., as Istio's sidecars, ztunnel and our waypoint write it
        lbl(src, "app"),
        lbl(src, "version"),
        w(dst, "name"),
        w(dst, "namespace"),
        w(dst, "spiffe_id"),
        f"{svc.name}.{svc.namespace}.svc.cluster.local" if svc is not None else w(dst, "name"),
        svc.name if svc is not None else "unknown",
        svc.namespace if svc is not None else "unknown",
        lbl(dst, "app"),
        lbl(dst, "version"),
        "tcp",
        flags,
        security,
    )


class TunnelMetrics:
    def __init__(self, tunnel):
        self.t = tunnel
        self.opened: Counter = Counter()
        self.closed: Counter = Counter()
        self.registry = Registry(self)

    def collect(self):
        opened, closed, st = Counter(self.opened), Counter(self.closed), Counter(self.t.stats)
        refused_all = Counter(self.t.listener.refused if self.t.listener else {})
        pairs = self.t.splicer.active
        for r in self.t.workers.reports():  # the other workers' counters
            opened.update({tuple(k): v for k, v in r["opened"]})
            closed.update({tuple(k): v for k, v in r["closed"]})
            st.update(r["stats"])
            refused_all.update(r["refused"])
            pairs += r["splice_pairs"]
        o = CounterMetricFamily(
            "istio_tcp_connections_opened", "TCP connections opened", labels=ISTIO_LABELS
        )
        for k, v in opened.items():
            o.add_metric(k, v)
        yield o
        c = CounterMetricFamily(
            "istio_tcp_connections_closed", "TCP connections closed", labels=ISTIO_LABELS
        )
        for k, v in closed.items():
            c.add_metric(k, v)
        yield c
        flows = CounterMetricFamily("dabba_tunnel_flows", "Flows handled, by path", labels=["path"])
        for path in ("hbone", "splice", "passthrough", "inbound", "relayed"):
            flows.add_metric([path], st.get(path, 0))
        yield flows
        denied = CounterMetricFamily(
            "dabba_tunnel_denied", "Connections refused, by reason", labels=["reason"]
        )
        for reason, key in (
            ("policy", "denied"),
            ("policy_inbound", "inbound_denied"),
            ("registry_only", "denied_registry_only"),
            ("unknown_source", "denied_unknown_source"),
            ("no_endpoint", "no_endpoint"),
            ("connect_failed", "connect_failed"),
            ("policy_recheck", "recheck_closed"),
        ):
            denied.add_metric([reason], st.get(key, 0))
        yield denied
        refused = CounterMetricFamily(
            "dabba_hbone_handshakes_refused",
            "Inbound HBONE connections refused at TLS, by kind",
            labels=["kind"],
        )
        for kind, v in refused_all.items():
            refused.add_metric([kind], v)
        yield refused
        yield GaugeMetricFamily(
            "dabba_splice_pairs_active",
            "Connection pairs the tunnel splices (splice(2) through pipes)",
            pairs,
        )
        yield CounterMetricFamily(
            "dabba_spliced_bytes",
            "Bytes the tunnel moved between spliced connections, never copied to user space",
            st.get("splice_bytes", 0),
        )
        yield GaugeMetricFamily(
            "dabba_tunnel_workers",
            "Tunnel processes sharing the ports",
            1 + len(self.t.workers.procs),
        )
        pool = self.t.pool.conns if self.t.pool else {}
        yield GaugeMetricFamily(
            "dabba_hbone_pool_connections",
            "Outbound HBONE connections in the pool",
            sum(1 for c in pool.values() if c.transport and not c.transport.is_closing()),
        )
        yield GaugeMetricFamily(
            "dabba_hbone_pool_streams",
            "Flows multiplexed on pooled HBONE connections",
            sum(len(c.streams) for c in pool.values()),
        )
        lb = self.t.lb
        yield CounterMetricFamily(
            "dabba_lb_ejections",
            "Endpoints ejected after connect failures",
            lb.stats.get("ejections", 0),
        )
        yield GaugeMetricFamily(
            "dabba_lb_endpoints_ejected", "Endpoints ejected now", len(lb.snapshot()["ejected"])
        )
        yield GaugeMetricFamily(
            "dabba_tunnel_config_version",
            "Snapshot version the tunnel enforces",
            self.t.state.version,
        )

    def render(self) -> tuple[int, str]:
        return 200, self.registry.text()


def merge_exposition(*texts: str) -> str:
    """Prometheus texts as one: a family both expose (istio_tcp_connections_opened: the
    tunnel's flows and the agent's direct ones) is one family whose samples are the sum of
    each text's. Prometheus refuses a family given twice in one scrape."""
    return merge(*texts)
