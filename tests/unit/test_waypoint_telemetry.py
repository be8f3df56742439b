"""A waypoint's request metrics from its Envoy's access log entries (agent/waypoint/telemetry.py):
the labels mean what the tunnels' istio_tcp_* labels mean. The source's pod, app and version
come from the baggage its tunnel sends on the CONNECT (hbone.baggage), its namespace from its
certificate; baggage that disagrees with the certificate, or is not baggage, says nothing.

The entries are Envoy's own protos (HTTPAccessLogEntry), filled as Envoy fills them; the lab
test (tests/cluster/test_waypoint.py) reads the same labels from a real Envoy.
"""

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from google.protobuf import any_pb2, wrappers_pb2

from agent.control.xds.common import SOURCE_BAGGAGE, SOURCE_FORWARDED, SOURCE_PRINCIPAL
from agent.waypoint.telemetry import LABELS, Telemetry, source_of
from agent.ztunnel.hbone import baggage

PRINCIPAL = "spiffe://cluster.local/ns/shop/sa/web"


def _entry(bag: str | None) -> al.HTTPAccessLogEntry:
    e = al.HTTPAccessLogEntry()
    c = e.common_properties
    c.upstream_cluster = "out|shop/api|80|v2"
    c.upstream_remote_address.envoy_internal_address.server_listener_name = (
        "ep|shop/api-7|10.20.2.11:8080"
    )
    c.route_name = "split"
    c.time_to_last_downstream_tx_byte.nanos = 3_500_000
    for key, value in ((SOURCE_PRINCIPAL, PRINCIPAL), (SOURCE_FORWARDED, "for=10.20.1.11"),
                       (SOURCE_BAGGAGE, bag)):  # fmt: skip
        if value is not None:
            a = any_pb2.Any()
            a.Pack(wrappers_pb2.StringValue(value=value))
            c.filter_state_objects[key].CopyFrom(a)
    e.request.request_method = 1  # GET
    e.request.path = "/cart"
    e.response.response_code.value = 200
    e.response.response_body_bytes = 1024
    return e


def _series(t: Telemetry) -> list[dict]:
    """istio_requests_total's label sets, as the registry exposes them."""
    out = [s.labels for m in t.registry.collect() for s in m.samples
           if s.name == "istio_requests_total"]  # fmt: skip
    assert all(tuple(s) == LABELS for s in out)
    return out


def test_the_source_is_its_pod_app_and_version_as_its_tunnel_says():
    t = Telemetry("shop/wp")
    t.record(_entry(baggage("shop", "web-5d8f-x2", "web", "v3")))
    (s,) = _series(t)
    assert {k: s[k] for k in ("source_workload", "source_workload_namespace", "source_app",
                              "source_version", "source_principal", "source_address",
                              "destination_workload", "destination_version")} == {
        "source_workload": "web-5d8f-x2", "source_workload_namespace": "shop",
        "source_app": "web", "source_version": "v3", "source_principal": PRINCIPAL,
        "source_address": "10.20.1.11", "destination_workload": "api-7",
        "destination_version": "v2"}  # fmt: skip
    (r,) = t.since(0)
    assert r["source"]["workload"] == "shop/web-5d8f-x2"


@pytest.mark.parametrize(
    "bag",
    [
        None,  # an older tunnel, or none at all
        baggage("other", "web-5d8f-x2", "web", "v3"),  # another namespace than its certificate's
        "k8s.pod.name=web-1",  # no namespace
        "\x00\xff==,,;;=",  # not baggage
        "k8s.namespace.name=shop," + "x=y," * 5000 + "k8s.pod.name=web-1",  # endless
    ],
)
def test_baggage_that_is_absent_disagrees_or_is_garbage_says_unknown(bag):
    t = Telemetry("shop/wp")
    t.record(_entry(bag))
    (s,) = _series(t)
    assert (s["source_workload"], s["source_app"], s["source_version"]) == ("unknown",) * 3
    assert s["source_workload_namespace"] == "shop"  # the certificate's, always


def test_baggage_is_percent_encoded_both_ways_and_omits_what_is_unknown():
    bag = baggage("shop", "web-1", "my app,v=1", "")
    assert bag == "k8s.namespace.name=shop,k8s.pod.name=web-1,service.name=my%20app%2Cv%3D1"
    assert source_of(bag, "shop") == ("web-1", "my app,v=1", "unknown")
    assert len(source_of(baggage("shop", "w" * 1000), "shop")[0]) == 253  # a label's longest


def test_the_exposition_is_what_prometheus_clients_counter_and_histograms_would_show():
    """Counts, sums and buckets (a value on a bound is in that bucket) as Prometheus' own
    client keeps them, for durations and sizes on, between and beyond the bounds."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from agent.waypoint.telemetry import BYTE_BUCKETS, MS_BUCKETS

    reg = CollectorRegistry()
    ref = (Counter("istio_requests_total", "Requests through the waypoint", LABELS, registry=reg),
           Histogram("istio_request_duration_milliseconds", "Request duration (ms)", LABELS,
                     buckets=MS_BUCKETS, registry=reg),
           Histogram("istio_request_bytes", "Request size (headers and body)", LABELS,
                     buckets=BYTE_BUCKETS, registry=reg),
           Histogram("istio_response_bytes", "Response size (headers and body)", LABELS,
                     buckets=BYTE_BUCKETS, registry=reg))  # fmt: skip
    t = Telemetry("shop/wp")
    for ms, req, resp, code in ((0.5, 0, 1, 200), (1.0, 10, 99, 200), (3.5, 1000, 10**7, 503),
                                (70_000, 123, 10**9, 200), (0.001, 1, 0, 404)):  # fmt: skip
        e = _entry(baggage("shop", "web-1", "web", "v1"))
        e.common_properties.time_to_last_downstream_tx_byte.seconds = int(ms // 1000)
        e.common_properties.time_to_last_downstream_tx_byte.nanos = round(ms % 1000 * 1e6)
        e.request.request_body_bytes = req
        e.response.response_body_bytes = resp
        e.response.response_code.value = code
        t.record(e)
        (labels,) = [tuple(s.values()) for s in _series(t)
                     if s["response_code"] == str(code)]  # fmt: skip
        ref[0].labels(*labels).inc()
        ref[1].labels(*labels).observe(
            e.common_properties.time_to_last_downstream_tx_byte.seconds * 1000
            + e.common_properties.time_to_last_downstream_tx_byte.nanos / 1e6
        )
        ref[2].labels(*labels).observe(req)
        ref[3].labels(*labels).observe(resp)
    want = generate_latest(reg).decode()
    want = "".join(
        ln + "\n" for ln in want.splitlines() if "_created" not in ln
    )  # fmt: skip  (Istio's series have no _created)
    assert t.registry.text() == want


def test_response_flags_are_istios_short_codes_in_order_and_every_name_is_envoys():
    from agent.waypoint.telemetry import FLAGS, flags_of

    rf = al.ResponseFlags()
    assert flags_of(rf) == "-"
    rf.upstream_retry_limit_exceeded = True
    rf.upstream_overflow = True
    rf.unauthorized_details.reason = al.ResponseFlags.Unauthorized.EXTERNAL_SERVICE
    assert flags_of(rf) == "UO,URX,UAEX"
    fields = {f.name for f in al.ResponseFlags.DESCRIPTOR.fields}
    assert set(FLAGS) <= fields, set(FLAGS) - fields  # a misspelt name would never show
    for name in FLAGS:
        one = al.ResponseFlags()
        setattr(one, name, True)
        assert flags_of(one) == FLAGS[name]
