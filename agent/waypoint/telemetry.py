"""Request telemetry of a waypoint, from its Envoy's gRPC access log stream
(``envoy.access_loggers.http_grpc``): Istio's request metrics, with Istio's names and labels
(``reporter="waypoint"``), and the recent requests `dabba requests` shows.

Upstream Envoy has no ``istio.stats``: every request's status, durations, bytes, flags, route
and upstream are in its access log entry, and the waypoint's configuration names what the
metrics need: a destination cluster is ``out|<namespace>/<service>|<port>|<subset>`` and an
endpoint ``ep|<namespace>/<pod>|<ip>:<port>`` (agent/control/xds/waypoint.py); the source's
identity and address come as filter state the waypoint set from the HBONE connection, and its
pod, app and version from the baggage its tunnel sent there (as Istio's ztunnel sends it): the
labels mean what the tunnels' istio_tcp_* labels mean (agent/ztunnel/metrics.py).
"""

from __future__ import annotations

import bisect
import collections
import functools
import time
import urllib.parse

from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import wrappers_pb2

from .. import log
from ..control.xds.common import SOURCE_BAGGAGE, SOURCE_FORWARDED, SOURCE_PRINCIPAL
from ..prom import CounterMetricFamily, HistogramMetricFamily, Registry, number

_log = log.get("waypoint")


RECENT = 2048
PATH = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"  # its gRPC method
# Envoy's short response flags (its access log's %RESPONSE_FLAGS%), as Istio's label shows them
FLAGS = {
    "failed_local_healthcheck": "LH", "no_healthy_upstream": "UH",
    "upstream_request_timeout": "UT", "local_reset": "LR", "upstream_remote_reset": "UR",
    "upstream_connection_failure": "UF", "upstream_connection_termination": "UC",
    "upstream_overflow": "UO", "no_route_found": "NR", "delay_injected": "DI",
    "fault_injected": "FI", "rate_limited": "RL", "rate_limit_service_error": "RLSE",
    "downstream_connection_termination": "DC", "upstream_retry_limit_exceeded": "URX",
    "stream_idle_timeout": "SI", "invalid_envoy_request_headers": "IH",
    "downstream_protocol_error": "DPE", "upstream_max_stream_duration_reached": "UMSDR",
    "response_from_cache_filter": "RFCF", "no_filter_config_found": "NFCF",
    "duration_timeout": "DT", "upstream_protocol_error": "UPE", "no_cluster_found": "NC",
    "overload_manager": "OM", "dns_resolution_failure": "DF", "downstream_remote_reset": "DR",
}  # fmt: skip
LABELS = (
    "reporter", "source_workload", "source_workload_namespace", "source_principal",
    "source_app", "source_version", "source_address", "destination_workload",
    "destination_workload_namespace",
    "destination_service", "destination_service_name", "destination_service_namespace",
    "destination_version", "request_protocol", "response_code", "response_flags",
    "connection_security_policy", "route_name",
)  # fmt: skip
MS_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
BYTE_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)


def flags_of(rf) -> str:
    """Envoy's flags as Istio writes them, in FLAGS' order ("-": none). Only the fields Envoy
    set are read (most requests: none), not every flag's."""
    have = {f.name for f, v in rf.ListFields() if v}
    if not have:
        return "-"
    out = [code for name, code in FLAGS.items() if name in have]
    if "unauthorized_details" in have:
        out.append("UAEX")
    return ",".join(out) or "-"


def _secs(d) -> float:
    return d.seconds + d.nanos / 1e9


def _namespace_of_principal(principal: str) -> str:
    """The namespace of spiffe://td/ns/<ns>/sa/<sa>."""
    parts = principal.split("/")
    if len(parts) == 7 and parts[3] == "ns" and parts[5] == "sa":
        return parts[4]
    return "unknown"


@functools.lru_cache(maxsize=1024)  # one baggage per source connection: the same text again
def source_of(baggage: str, namespace: str) -> tuple[str, str, str]:
    """(workload, app, version) from the baggage the source's tunnel sent
    (hbone.baggage()), "unknown" for what it does not say. Baggage naming another namespace
    than the source's certificate is not taken: the namespace is the certificate's word."""
    got: dict[str, str] = {}
    for item in baggage.split(",")[:8]:
        k, sep, v = item.partition("=")
        if sep:
            got[k.strip()] = urllib.parse.unquote(v.split(";", 1)[0].strip())[:253]
    if got.get("k8s.namespace.name") != namespace:
        return "unknown", "unknown", "unknown"
    pod, app, version = (got.get(k) or "unknown"
                         for k in ("k8s.pod.name", "service.name", "service.version"))  # fmt: skip
    return pod, app, version


class _Series:
    """One label set's request count and its three histograms (bucket counts, not cumulative;
    the last bucket is +Inf), as Istio's proxies keep them."""

    __slots__ = ("count", "ms", "ms_sum", "req", "req_sum", "resp", "resp_sum")

    def __init__(self):
        self.count = 0
        self.ms, self.req, self.resp = ([0] * (len(MS_BUCKETS) + 1),
                                        [0] * (len(BYTE_BUCKETS) + 1),
                                        [0] * (len(BYTE_BUCKETS) + 1))  # fmt: skip
        self.ms_sum = self.req_sum = self.resp_sum = 0.0


def _observe(counts: list, bounds: tuple, v: float) -> None:
    counts[bisect.bisect_left(bounds, v)] += 1


def _cumulative(counts: list, bounds: tuple) -> list[tuple[str, float]]:
    acc, out = 0, []
    for b, n in zip((*(number(b) for b in bounds), "+Inf"), counts, strict=True):
        acc += n
        out.append((b, acc))
    return out


class Telemetry:
    def __init__(self, waypoint: str):
        self.waypoint = waypoint
        self.series: dict[tuple, _Series] = {}
        self.registry = Registry(self)
        self.recent: collections.deque[dict] = collections.deque(maxlen=RECENT)
        self.seq = 0
        self.received = 0

    async def StreamAccessLogs(self, request_iterator):
        async for msg in request_iterator:
            for e in msg.http_logs.log_entry:
                try:
                    self.record(e)
                except Exception as ex:  # one odd entry must not end the stream
                    _log.warning(f"access log entry not counted: {ex}")
        return als_pb2.StreamAccessLogsResponse()

    def collect(self):
        total = CounterMetricFamily("istio_requests_total", "Requests through the waypoint",
                                    labels=LABELS)  # fmt: skip
        ms = HistogramMetricFamily("istio_request_duration_milliseconds",
                                   "Request duration (ms)", labels=LABELS)  # fmt: skip
        req = HistogramMetricFamily("istio_request_bytes", "Request size (headers and body)",
                                    labels=LABELS)  # fmt: skip
        resp = HistogramMetricFamily("istio_response_bytes", "Response size (headers and body)",
                                     labels=LABELS)  # fmt: skip
        for labels, s in self.series.items():
            total.add_metric(labels, s.count)
            ms.add_metric(labels, _cumulative(s.ms, MS_BUCKETS), s.ms_sum)
            req.add_metric(labels, _cumulative(s.req, BYTE_BUCKETS), s.req_sum)
            resp.add_metric(labels, _cumulative(s.resp, BYTE_BUCKETS), s.resp_sum)
        return [total, ms, req, resp]

    def record(self, e) -> None:
        c, rq, rs = e.common_properties, e.request, e.response
        fs = c.filter_state_objects
        principal = _unpack_string(fs.get(SOURCE_PRINCIPAL)) or "unknown"
        address = _forwarded_for(_unpack_string(fs.get(SOURCE_FORWARDED))) or ""
        sns = _namespace_of_principal(principal)
        swl, sapp, sver = source_of(_unpack_string(fs.get(SOURCE_BAGGAGE)), sns)
        cluster = c.upstream_cluster
        svc_key, version = "", ""
        if cluster.startswith("out|"):
            _, svc_key, _port, version = (cluster.split("|") + ["", "", ""])[:4]
        sns_svc, _, sname = svc_key.partition("/")
        upstream = c.upstream_remote_address.envoy_internal_address.server_listener_name
        dwl, dns = "unknown", "unknown"
        if upstream.startswith("ep|"):
            pod = upstream.split("|")[1]
            dns, _, dwl = pod.partition("/")
        code = rs.response_code.value if rs.HasField("response_code") else 0
        duration_ms = _secs(c.time_to_last_downstream_tx_byte) * 1000
        flags = flags_of(c.response_flags)
        labels = (
            "waypoint", swl, sns, principal, sapp, sver, address, dwl, dns,
            f"{sname}.{sns_svc}.svc.cluster.local" if sname else "unknown",
            sname or "unknown", sns_svc or "unknown", version or "unknown",
            {0: "http", 1: "http", 2: "http", 3: "grpc"}.get(e.protocol_version, "http"),
            str(code), flags, "mutual_tls", c.route_name or "-",
        )  # fmt: skip
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = _Series()
        n_req = rq.request_headers_bytes + rq.request_body_bytes
        n_resp = rs.response_headers_bytes + rs.response_body_bytes
        s.count += 1
        s.ms_sum += duration_ms
        s.req_sum += n_req
        s.resp_sum += n_resp
        _observe(s.ms, MS_BUCKETS, duration_ms)
        _observe(s.req, BYTE_BUCKETS, n_req)
        _observe(s.resp, BYTE_BUCKETS, n_resp)
        self.received += 1
        self.seq += 1
        start = c.start_time.seconds + c.start_time.nanos / 1e9
        self.recent.append({
            "seq": self.seq,
            "time": start or time.time(),
            "waypoint": self.waypoint,
            "source": {"principal": principal, "address": address,
                       "workload": f"{sns}/{swl}" if swl != "unknown" else ""},
            "destination": {"service": svc_key, "subset": version,
                            "workload": f"{dns}/{dwl}" if dwl != "unknown" else ""},
            "method": rq.request_method and _METHODS.get(rq.request_method, ""),
            "authority": rq.authority,
            "path": rq.path,
            "status": code,
            "duration_ms": round(duration_ms, 3),
            "request_bytes": rq.request_body_bytes,
            "response_bytes": rs.response_body_bytes,
            "flags": flags,
            "route": c.route_name,
            "attempts": c.upstream_request_attempt_count,
        })  # fmt: skip

    def since(self, seq: int = 0) -> list[dict]:
        return [r for r in self.recent if r["seq"] > seq]


def _forwarded_for(value: str) -> str:
    """The address of a Forwarded: for=... value (as our tunnels write it: agent/ztunnel/hbone/
    codec.py's forwarded())."""
    for part in value.split(";"):
        k, _, v = part.strip().partition("=")
        if k.lower() == "for":
            return v.strip('"').strip("[]")
    return ""


def _unpack_string(a) -> str:
    """A filter state object as Envoy logs it (an Any of a string value)."""
    if a is None:
        return ""
    v = wrappers_pb2.StringValue()
    if a.Unpack(v):
        return v.value
    return a.value.decode(errors="replace") if a.value else ""


def _method_names() -> dict[int, str]:
    from envoy.config.core.v3 import base_pb2

    return {v.number: v.name for v in base_pb2.RequestMethod.DESCRIPTOR.values}


_METHODS = _method_names()
