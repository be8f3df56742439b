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

from agent.control.xds.waypoint import SOURCE_BAGGAGE, SOURCE_FORWARDED, SOURCE_PRINCIPAL
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
