"""One waypoint's Envoy configuration, from the registry's state: what the control plane serves
it over ADS (ads.py). Upstream Envoy only (see ../shared/notes/waypoints.md):

- ``hbone_in`` listens on 15008: mutual TLS 1.3 (its certificate and the trust bundle by SDS
  from the local supervisor, `dabba waypoint run`; any workload of the trust domain may call),
  HTTP/2 with CONNECT. Each opted-in service's VIP and port is a virtual host whose CONNECT
  route terminates the tunnel into that service's internal listener.
- ``svc|<namespace>/<name>|<port>``, an internal listener per service port: the HTTP inside
  the tunnel, routed by the service's VirtualService (or to all its endpoints), with fault
  injection and the router; every request goes to the access log stream.
- ``out|<namespace>/<name>|<port>|<subset>`` clusters: the endpoints of a route destination
  (DestinationRule subsets, load balancing, circuit breakers, outlier detection), each an
  internal address ``ep|<namespace>/<pod>|<ip>:<port>``.
- ``ep|<namespace>/<pod>|<ip>:<port>``, an internal listener per endpoint: a TCP proxy tunnelling to the
  endpoint's node's tunnel over HBONE (CONNECT ip:port), in cluster
  ``hbone|<node>|<identity>``: mutual TLS presenting the waypoint's identity, requiring the
  endpoint's.

Resources are plain dicts in Envoy's JSON form; ads.py packs them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ...ztunnel.tls import sni_for  # the name our tunnels' HBONE server maps back
from .. import model as m
from .. import routing as r
from . import rbac
from .common import (  # noqa: F401 (names the waypoint's side shares, used from here too)
    ALS_CLUSTER,
    BUNDLE,
    CERT,
    SDS_CLUSTER,
    SOURCE_BAGGAGE,
    SOURCE_FORWARDED,
    SOURCE_PRINCIPAL,
    T,
    h2_upstream,
    tls_common,
)

HBONE_PORT = 15008
CONNECT_TIMEOUT = "5s"
# Istio's default for a route without retries: 2 attempts on what is safe to retry
DEFAULT_RETRY = {"retry_on": "connect-failure,refused-stream,unavailable,cancelled,"
                             "retriable-status-codes",
                 "num_retries": 2, "retriable_status_codes": [503]}  # fmt: skip


def _internal(name: str) -> dict:
    return {"envoy_internal_address": {"server_listener_name": name}}


# clusters whose endpoints are internal listeners: filter state crosses to them
INTERNAL_UPSTREAM = {"name": "envoy.transport_sockets.internal_upstream", "typed_config": {
    "@type": T + "extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
    "transport_socket": {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {
        "@type": T + "extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}}}  # fmt: skip


def _keep(key: str, value: str) -> dict:
    return {"object_key": key, "factory_key": "envoy.string", "shared_with_upstream": "TRANSITIVE",
            "skip_if_empty": True,
            "format_string": {"text_format_source": {"inline_string": value}}}  # fmt: skip


def _static(name: str, addresses: list[dict]) -> dict:
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": a}} for a in addresses]}]}  # fmt: skip


def _access_log(waypoint: r.Waypoint) -> list[dict]:
    return [{"name": "envoy.access_loggers.http_grpc", "typed_config": {
        "@type": T + "extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
        "common_config": {"log_name": waypoint.key, "transport_api_version": "V3",
                          "grpc_service": {"envoy_grpc": {"cluster_name": ALS_CLUSTER}},
                          "buffer_flush_interval": "0.2s",  # dabba requests -f: promptly
                          "filter_state_objects_to_log": [SOURCE_PRINCIPAL, SOURCE_FORWARDED,
                                                          SOURCE_BAGGAGE]},
    }}]  # fmt: skip


def _string_match(sm: r.StringMatch) -> dict:
    if sm.kind == "regex":
        return {"safe_regex": {"regex": sm.value}}
    return {sm.kind: sm.value}


def _route_match(mt: r.HttpMatch | None) -> dict:
    out: dict = {"prefix": "/"}
    if mt is not None and mt.uri is not None:
        out = {"path" if mt.uri.kind == "exact" else mt.uri.kind: mt.uri.value}
        if mt.uri.kind == "regex":
            out = {"safe_regex": {"regex": mt.uri.value}}
    headers = []
    if mt is not None and mt.method is not None:
        headers.append({"name": ":method", "string_match": _string_match(mt.method)})
    for name, sm in mt.headers if mt is not None else ():
        headers.append({"name": name, "string_match": _string_match(sm)})
    if headers:
        out["headers"] = headers
    return out


def _percent(p: float) -> dict:
    return {"numerator": round(p * 10000), "denominator": "MILLION"}


def _duration(s: float) -> str:
    return f"{s:.6f}s"


def out_cluster(svc: m.Service, port: int, subset: str) -> str:
    return f"out|{svc.key}|{port}|{subset}"


@dataclass(frozen=True)
class Tracing:
    collector: str  # IP:PORT
    sampling: float  # percent of requests
    kind: str = "zipkin"  # or "otlp": OpenTelemetry's protocol over gRPC (W3C traceparent)


# the request headers the waypoint sets (overwriting any the client sent) for its span's tags
SOURCE_HEADERS = (("x-dabba-source-principal", SOURCE_PRINCIPAL),
                  ("x-dabba-source-forwarded", SOURCE_FORWARDED))  # fmt: skip


class Builder:
    """The resources of one waypoint for one state."""

    def __init__(self, state: m.State, waypoint: r.Waypoint, trust_domain: str,
                 nodes: dict[str, str], tracing: Tracing | None = None):  # fmt: skip
        self.st, self.wp, self.td, self.nodes = state, waypoint, trust_domain, nodes
        self.tracing = tracing
        self.listeners: dict[str, dict] = {}
        self.clusters: dict[str, dict] = {}
        self.skipped: list[str] = []  # endpoints left out, and why
        if tracing is not None:
            host, _, port = tracing.collector.rpartition(":")
            self.clusters[tracing.kind] = {
                "name": tracing.kind, "type": "STATIC", "connect_timeout": CONNECT_TIMEOUT,
                "load_assignment": _static(tracing.kind, [{"socket_address": {
                    "address": host, "port_value": int(port)}}])}  # fmt: skip
            if tracing.kind == "otlp":  # gRPC
                self.clusters["otlp"]["typed_extension_protocol_options"] = h2_upstream()
        rules = {dr.service: dr for dr in state.destination_rules.values()}
        routed = {h: vs for vs in state.routes() for h in vs.hosts}
        vhosts = []
        for svc in sorted(state.services.values(), key=lambda s: s.key):
            if state.waypoint_of(svc) != waypoint.key:
                continue
            for sp in svc.ports:
                inner = f"svc|{svc.key}|{sp.port}"
                self.clusters[f"inner|{svc.key}|{sp.port}"] = {
                    "name": f"inner|{svc.key}|{sp.port}", "type": "STATIC",
                    "connect_timeout": CONNECT_TIMEOUT, "transport_socket": INTERNAL_UPSTREAM,
                    "load_assignment": _static(f"inner|{svc.key}|{sp.port}", [_internal(inner)]),
                }  # fmt: skip
                vhosts.append({
                    "name": f"{svc.key}|{sp.port}",
                    "domains": [f"{svc.vip}:{sp.port}" if ":" not in svc.vip
                                else f"[{svc.vip}]:{sp.port}"],
                    "routes": [{"match": {"connect_matcher": {}}, "route": {
                        "cluster": f"inner|{svc.key}|{sp.port}",
                        "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
                    }}],
                })  # fmt: skip
                self.listeners[inner] = self._service_listener(
                    inner, svc, sp, routed.get(svc.key), rules
                )
        self.listeners["hbone_in"] = self._hbone_in(vhosts)

    # ---- the waypoint's front: HBONE in -----------------------------------------------------
    def _hbone_in(self, vhosts: list[dict]) -> dict:
        return {
            "name": "hbone_in",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": HBONE_PORT}},
            "filter_chains": [{
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": T + "extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "require_client_certificate": True,
                    "common_tls_context": tls_common({"prefix": f"spiffe://{self.td}/ns/"}),
                }},
                "filters": [{"name": "envoy.filters.network.http_connection_manager",
                             "typed_config": {
                    "@type": T + "extensions.filters.network.http_connection_manager.v3."
                                 "HttpConnectionManager",
                    "stat_prefix": "hbone_in",
                    "codec_type": "HTTP2",
                    "http2_protocol_options": {"allow_connect": True},
                    "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                    "route_config": {"name": "hbone_in", "virtual_hosts": vhosts},
                    "http_filters": [
                        {"name": "envoy.filters.http.set_filter_state", "typed_config": {
                            "@type": T + "extensions.filters.http.set_filter_state.v3.Config",
                            "on_request_headers": [
                                _keep(SOURCE_PRINCIPAL, "%DOWNSTREAM_PEER_URI_SAN%"),
                                _keep(SOURCE_FORWARDED, "%REQ(forwarded)%"),
                                _keep(SOURCE_BAGGAGE, "%REQ(baggage)%")]}},
                        {"name": "envoy.filters.http.router", "typed_config": {
                            "@type": T + "extensions.filters.http.router.v3.Router"}}],
                }}],
            }],
        }  # fmt: skip

    # ---- one service port: its routes ------------------------------------------------------
    def _service_listener(self, name: str, svc: m.Service, sp: m.ServicePort, vs, rules) -> dict:
        routes = []
        if vs is not None:
            for hr in vs.http:
                action = self._action(svc, sp, hr, rules)
                for mt in hr.matches or (None,):
                    route = {"name": hr.name, "match": _route_match(mt), "route": action}
                    if hr.fault is not None:
                        route["typed_per_filter_config"] = {
                            "envoy.filters.http.fault": self._fault(hr.fault)
                        }
                    routes.append(route)
        else:
            routes.append({"name": "default", "match": {"prefix": "/"},
                           "route": self._action(svc, sp, None, rules)})  # fmt: skip
        hcm_extra: dict = {}
        route_extra: dict = {}
        if self.tracing is not None:
            hcm_extra["tracing"] = self._tracing(svc)
            route_extra["request_headers_to_add"] = [
                {"header": {"key": h, "value": f"%FILTER_STATE({k}:PLAIN)%"},
                 "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"} for h, k in SOURCE_HEADERS]  # fmt: skip
        return {
            "name": name,
            "internal_listener": {},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": T + "extensions.filters.network.http_connection_manager.v3."
                                 "HttpConnectionManager",
                    "stat_prefix": name,
                    "codec_type": "AUTO",
                    **hcm_extra,
                    "route_config": {"name": name, **route_extra, "virtual_hosts": [
                        {"name": svc.key, "domains": ["*"], "routes": routes}]},
                    "http_filters": [
                        *rbac.filters(self._policies(svc), sp.port, sp.target_port,
                                      SOURCE_PRINCIPAL),
                        {"name": "envoy.filters.http.fault", "typed_config": {
                            "@type": T + "extensions.filters.http.fault.v3.HTTPFault"}},
                        {"name": "envoy.filters.http.router", "typed_config": {
                            "@type": T + "extensions.filters.http.router.v3.Router"}},
                    ],
                    "access_log": _access_log(self.wp),
                },
            }]}],
        }  # fmt: skip

    def _tracing(self, svc: m.Service) -> dict:
        """Spans to Zipkin (B3 propagated to the destination) or to an OpenTelemetry collector
        over OTLP/gRPC (W3C traceparent propagated; the service is named as Istio names a
        waypoint's, NAME.NAMESPACE), tagged with the waypoint, the destination service and the
        source's identity and address."""
        if self.tracing.kind == "otlp":
            provider = {"name": "envoy.tracers.opentelemetry", "typed_config": {
                "@type": T + "config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": "otlp"}, "timeout": "2s"},
                "service_name": f"{self.wp.name}.{self.wp.namespace}"}}  # fmt: skip
        else:
            provider = {"name": "envoy.tracers.zipkin", "typed_config": {
                "@type": T + "config.trace.v3.ZipkinConfig",
                "collector_cluster": "zipkin", "collector_endpoint": "/api/v2/spans",
                "collector_endpoint_version": "HTTP_JSON", "trace_id_128bit": True,
                "shared_span_context": False}}  # fmt: skip
        return {
            "random_sampling": {"value": self.tracing.sampling},
            "provider": provider,
            "custom_tags": [
                {"tag": "waypoint", "literal": {"value": self.wp.key}},
                {"tag": "destination.service", "literal": {"value": svc.key}},
                {"tag": "source.principal",
                 "request_header": {"name": "x-dabba-source-principal"}},
                {"tag": "source.forwarded",
                 "request_header": {"name": "x-dabba-source-forwarded"}},
            ],
        }  # fmt: skip

    def _policies(self, svc: m.Service) -> list[m.AuthorizationPolicy]:
        """The AuthorizationPolicies this waypoint enforces for svc: those that target it, or
        the waypoint's Gateway (Istio's targetRefs)."""
        return [p for p in self.st.authz.values()
                if (p.namespace == svc.namespace and ("Service", svc.name) in p.target_refs)
                or (p.namespace == self.wp.namespace
                    and ("Gateway", self.wp.name) in p.target_refs)]  # fmt: skip

    def _fault(self, f: r.Fault) -> dict:
        out: dict = {"@type": T + "extensions.filters.http.fault.v3.HTTPFault"}
        if f.abort_status:
            out["abort"] = {"http_status": f.abort_status, "percentage": _percent(f.abort_percent)}
        if f.delay:
            out["delay"] = {"fixed_delay": _duration(f.delay),
                            "percentage": _percent(f.delay_percent)}  # fmt: skip
        return out

    def _action(self, svc: m.Service, sp: m.ServicePort, hr: r.HttpRoute | None, rules) -> dict:
        dests = hr.destinations if hr is not None else (r.Destination(svc.key),)
        names = []
        for d in dests:
            dsvc = self.st.services[d.service]
            port = next((p for p in dsvc.ports if p.port == (d.port or sp.port)), None)
            if port is None:  # a port the destination does not have: Envoy answers 503
                port = dsvc.ports[0]
            names.append((self._out_cluster(dsvc, port, d.subset, rules.get(d.service)), d.weight))
        action: dict = {"timeout": _duration(hr.timeout) if hr and hr.timeout else "0s"}
        if len(names) == 1:
            action["cluster"] = names[0][0]
        else:
            action["weighted_clusters"] = {"clusters": [
                {"name": n, "weight": w} for n, w in names if w > 0]}  # fmt: skip
        if hr is not None and hr.retries is not None:
            rp: dict = {"retry_on": hr.retries.retry_on, "num_retries": hr.retries.attempts}
            if hr.retries.per_try_timeout:
                rp["per_try_timeout"] = _duration(hr.retries.per_try_timeout)
            if "retriable-status-codes" in hr.retries.retry_on:
                rp["retriable_status_codes"] = [503]
            if hr.retries.attempts:
                action["retry_policy"] = rp
        else:
            action["retry_policy"] = DEFAULT_RETRY
        return action

    # ---- destinations -----------------------------------------------------------------------
    def _out_cluster(self, svc: m.Service, port: m.ServicePort, subset: str, dr) -> str:
        name = out_cluster(svc, port.port, subset)
        if name in self.clusters:
            return name
        sub = dr.subset(subset) if dr is not None and subset else None
        pods = [w for w in self.st.endpoints(svc)
                if sub is None or all(w.labels.get(k) == v for k, v in sub.labels.items())]  # fmt: skip
        addrs = []
        for w in sorted(pods, key=lambda w: w.key):
            if w.node not in self.nodes:
                self.skipped.append(f"{w.key}: node {w.node} has no known address")
                continue
            ep = f"ep|{w.key}|{w.ip}:{port.target_port}"
            addrs.append(_internal(ep))
            if ep not in self.listeners:
                self.listeners[ep] = self._endpoint_listener(ep, w, port.target_port)
        policy = (sub.policy if sub is not None and sub.policy else None) or (
            dr.policy if dr is not None else None
        )
        c: dict = {
            "name": name,
            "type": "STATIC",
            "connect_timeout": CONNECT_TIMEOUT,
            "load_assignment": _static(name, addrs),
            "transport_socket": INTERNAL_UPSTREAM,
        }
        if policy is not None:
            c.update(_traffic_policy(policy))
        self.clusters[name] = c
        return name

    def _endpoint_listener(self, name: str, w: m.Workload, port: int) -> dict:
        ident = w.spiffe(self.td)
        hbone = f"hbone|{w.node}|{ident}"
        if hbone not in self.clusters:
            self.clusters[hbone] = {
                "name": hbone,
                "type": "STATIC",
                "connect_timeout": CONNECT_TIMEOUT,
                "load_assignment": _static(hbone, [{"socket_address": {
                    "address": self.nodes[w.node], "port_value": HBONE_PORT}}]),
                "typed_extension_protocol_options": h2_upstream(),
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": T + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "sni": sni_for(ident),
                    "common_tls_context": tls_common({"exact": ident}),
                }},
            }  # fmt: skip
        target = f"{w.ip}:{port}"
        return {
            "name": name,
            "internal_listener": {},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": T + "extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": name,
                    "cluster": hbone,
                    "tunneling_config": {"hostname": target, "headers_to_add": [{
                        # the destination's tunnel records the flow's source before the waypoint
                        "header": {"key": "forwarded",
                                   "value": f"%FILTER_STATE({SOURCE_FORWARDED}:PLAIN)%"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]},
                },
            }]}],
        }  # fmt: skip


def _traffic_policy(p: r.TrafficPolicy) -> dict:
    out: dict = {}
    if p.lb:
        out["lb_policy"] = p.lb
    th = {k: v for k, v in (
        ("max_connections", p.max_connections), ("max_pending_requests", p.max_pending),
        ("max_requests", p.max_requests), ("max_retries", p.max_retries)) if v is not None}  # fmt: skip
    if th:
        out["circuit_breakers"] = {"thresholds": [th]}
    if p.max_requests_per_connection:
        out["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": T + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": {
                    "max_requests_per_connection": p.max_requests_per_connection},
                "explicit_http_config": {"http_protocol_options": {}},
            }}  # fmt: skip
    if p.consecutive_5xx is not None:
        od: dict = {"consecutive_5xx": p.consecutive_5xx,
                    "enforcing_consecutive_5xx": 100,
                    "consecutive_gateway_failure": p.consecutive_5xx,
                    "enforcing_consecutive_gateway_failure": 0}  # fmt: skip
        if p.interval is not None:
            od["interval"] = _duration(p.interval)
        if p.base_ejection is not None:
            od["base_ejection_time"] = _duration(p.base_ejection)
        if p.max_ejection_percent is not None:
            od["max_ejection_percent"] = p.max_ejection_percent
        out["outlier_detection"] = od
    return out


def build(state: m.State, waypoint: r.Waypoint, trust_domain: str, nodes: dict[str, str],
          tracing: Tracing | None = None) -> Builder:  # fmt: skip
    return Builder(state, waypoint, trust_domain, nodes, tracing)


def version_of(resources: list[dict]) -> str:
    """A version naming exactly these resources (the same after a control plane restart)."""
    blob = json.dumps(resources, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
