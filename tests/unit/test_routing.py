"""L7 routing documents (Gateway of class istio-waypoint, VirtualService, DestinationRule): what
is accepted, what becomes each waypoint's Envoy configuration, and the bad input each refuses
with its file and line (the last good state stays: the registry's reload is all or nothing,
tried in tests/unit/test_registry.py and, against a real Envoy, tests/cluster/test_waypoint.py).
"""

import os
import textwrap

import pytest

from agent.control import routing
from agent.control.registry import RegistryError, load_dir
from agent.control.xds import ads
from agent.control.xds import waypoint as wpx

BASE = textwrap.dedent("""\
    apiVersion: dabbawala.io/v1
    kind: Workload
    metadata: {name: api-1, namespace: shop, labels: {app: api, version: v1}}
    spec: {serviceAccount: api, node: n2, ip: 10.20.2.11}
    ---
    apiVersion: dabbawala.io/v1
    kind: Workload
    metadata: {name: api-2, namespace: shop, labels: {app: api, version: v2}}
    spec: {serviceAccount: api, node: n2, ip: 10.20.2.12}
    ---
    apiVersion: dabbawala.io/v1
    kind: Workload
    metadata:
      name: wp
      namespace: shop
      labels: {gateway.networking.k8s.io/gateway-name: wp}
    spec: {serviceAccount: wp, node: n3, ip: 10.20.3.11}
    ---
    apiVersion: dabbawala.io/v1
    kind: Service
    metadata: {name: api, namespace: shop, labels: {istio.io/use-waypoint: wp}}
    spec: {vip: 10.96.0.60, ports: [{port: 80, targetPort: 8080}], selector: {app: api}}
    ---
    apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata: {name: wp, namespace: shop}
    spec: {gatewayClassName: istio-waypoint}
""")
RULE = textwrap.dedent("""\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: api, namespace: shop}
    spec:
      host: api
      trafficPolicy:
        connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}
        outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 30s}
      subsets:
      - {name: v1, labels: {version: v1}}
      - {name: v2, labels: {version: v2}}
""")
ROUTE = textwrap.dedent("""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: api, namespace: shop}
    spec:
      hosts: [api.shop.svc.cluster.local]
      http:
      - name: get-only
        match: [{method: {exact: GET}, uri: {prefix: /v2}}]
        route: [{destination: {host: api, subset: v2}}]
        retries: {attempts: 3, perTryTimeout: 200ms, retryOn: 5xx}
        timeout: 1s
      - name: split
        route:
        - {destination: {host: api, subset: v1}, weight: 90}
        - {destination: {host: api, subset: v2}, weight: 10}
        fault: {abort: {httpStatus: 503, percentage: {value: 5}}}
""")


def _load(tmp_path, *texts):
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.yaml").write_text(t)
    return load_dir(str(tmp_path))


def test_routing_documents_are_read_into_the_state(tmp_path):
    st = _load(tmp_path, BASE, RULE, ROUTE)
    assert st.waypoints["shop/wp"].spiffe("td") == "spiffe://td/ns/shop/sa/wp"
    assert [w.key for w in st.waypoint_pods("shop/wp")] == ["shop/wp"]
    assert st.warnings == []  # the service's waypoint exists and has a pod
    vs = st.virtual_services["shop/api"]
    assert vs.hosts == ("shop/api",)
    first, split = vs.http
    assert first.matches[0].method == routing.StringMatch("exact", "GET")
    assert first.retries == routing.Retries(3, 0.2, "5xx") and first.timeout == 1.0
    assert [(d.subset, d.weight) for d in split.destinations] == [("v1", 90), ("v2", 10)]
    assert split.fault == routing.Fault(abort_percent=5.0, abort_status=503)
    tp = st.destination_rules["shop/api"].policy
    assert (tp.max_connections, tp.max_pending, tp.consecutive_5xx, tp.base_ejection) == (
        1, 1, 2, 30.0)  # fmt: skip


def test_a_waypoints_configuration_is_valid_envoy_configuration(tmp_path):
    """Every resource packs into Envoy's own protos (an unknown field or a wrong type fails
    there), and names what telemetry reads back."""
    st = _load(tmp_path, BASE, RULE, ROUTE)
    b = wpx.build(st, st.waypoints["shop/wp"], "td", {"n2": "10.10.0.12"})
    ads.pack(ads.CDS, list(b.clusters.values()))
    ads.pack(ads.LDS, list(b.listeners.values()))
    assert sorted(b.listeners) == [
        "ep|shop/api-1|10.20.2.11:8080", "ep|shop/api-2|10.20.2.12:8080", "hbone_in",
        "svc|shop/api|80"]  # fmt: skip
    assert sorted(b.clusters) == [
        "hbone|n2|spiffe://td/ns/shop/sa/api", "inner|shop/api|80", "out|shop/api|80|v1",
        "out|shop/api|80|v2"]  # fmt: skip
    vhosts = b.listeners["hbone_in"]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"]  # fmt: skip
    assert [v["domains"] for v in vhosts] == [["10.96.0.60:80"]]
    hcm = b.listeners["svc|shop/api|80"]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[0]["route"]["retry_policy"] == {
        "retry_on": "5xx", "num_retries": 3, "per_try_timeout": "0.200000s"}  # fmt: skip
    assert routes[1]["route"]["weighted_clusters"]["clusters"] == [
        {"name": "out|shop/api|80|v1", "weight": 90}, {"name": "out|shop/api|80|v2", "weight": 10}]  # fmt: skip
    v1 = b.clusters["out|shop/api|80|v1"]
    assert v1["circuit_breakers"]["thresholds"] == [
        {"max_connections": 1, "max_pending_requests": 1}
    ]
    assert v1["outlier_detection"]["consecutive_5xx"] == 2
    tls = b.clusters["hbone|n2|spiffe://td/ns/shop/sa/api"]["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.shop.hbone.dabba"  # the destination's tunnel picks its identity so
    # a node no pod is known on is left out, and said
    b = wpx.build(st, st.waypoints["shop/wp"], "td", {})
    assert sorted(b.skipped) == [
        "shop/api-1: node n2 has no known address", "shop/api-2: node n2 has no known address"]  # fmt: skip


BAD = [
    # (document, the error's line, what it says)
    (ROUTE.replace("weight: 10", "weight: 20"), 14, "the weights sum to 110, not 100"),
    (ROUTE.replace("subset: v2}, weight", "subset: v3}, weight"), 15,
     "subset v3 of shop/api is defined by no DestinationRule"),
    (ROUTE.replace("hosts: [api.shop.svc.cluster.local]", "hosts: [nope]"), 1,
     "VirtualService shop/api: shop/nope is no service in the registry"),
    (ROUTE.replace("timeout: 1s", "timeout: soon"), 11, "timeout: 'soon' is not a duration"),
    (ROUTE.replace("retryOn: 5xx", "retryOn: sometimes"), 10, "unknown condition 'sometimes'"),
    (ROUTE.replace("  - name: split", "  - name: split\n    mirror: {host: api}"), 13,
     "http route: unknown field 'mirror'"),
    (ROUTE.replace("{prefix: /v2}", "{glob: /v2}"), 8, "unknown match 'glob'"),
    (RULE.replace("version: v2}", "version: v9}"), 1,
     "subset v2 (version=v9) matches none of shop/api's pods (shop/api-1, shop/api-2)"),
    (RULE.replace("maxConnections: 1", "maxConnections: lots"), 7,
     "maxConnections must be a whole number"),
    (BASE.replace("istio-waypoint", "istio"), 27, "class 'istio' is not served here"),
]  # fmt: skip


@pytest.mark.parametrize("doc,line,what", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_routing_input_is_refused_naming_file_and_line(tmp_path, doc, line, what):
    texts = [BASE, RULE, ROUTE]
    i = next(i for i, t in enumerate(texts) if t.split("\n")[1] == doc.split("\n")[1]
             and t.split("kind: ")[1][:8] == doc.split("kind: ")[1][:8])  # fmt: skip
    texts[i] = doc
    with pytest.raises(RegistryError) as e:
        _load(tmp_path, *texts)
    assert str(e.value).startswith(f"{tmp_path / f'{i}.yaml'}:{line}: "), str(e.value)
    assert what in str(e.value)


def test_host_names_as_istio_writes_them():
    assert routing.host_key("api", "shop") == "shop/api"
    assert routing.host_key("api.other", "shop") == "other/api"
    assert routing.host_key("api.other.svc.cluster.local", "shop") == "other/api"
    assert routing.host_key("*.shop.svc.cluster.local", "shop") == ""
    assert routing.host_key("example.com.au", "shop") == ""


AUTHZ = textwrap.dedent("""\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: api-get, namespace: shop}
    spec:
      targetRefs: [{kind: Service, group: "", name: api}]
      action: ALLOW
      rules:
      - from: [{source: {principals: [td/ns/shop/sa/web]}}]
        to: [{operation: {methods: [GET], paths: [/v1/*], notPorts: [9090]}}]
        when: [{key: "request.headers[x-team]", values: [blue]}]
      - from: [{source: {namespaces: [ops], notPrincipals: ["*/sa/intruder"]}}]
      - from: [{source: {ipBlocks: [10.0.0.0/8]}}]
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: no-delete, namespace: shop}
    spec:
      targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]
      action: DENY
      rules: [{to: [{operation: {methods: [DELETE]}}]}]
""")


def test_authorization_policies_that_target_a_waypoint_become_its_rbac_not_the_tunnels(tmp_path):
    st = _load(tmp_path, BASE, AUTHZ)
    assert st.warnings == []  # no fail-safe warning: the waypoint decides their L7 fields
    api1 = st.workloads["shop/api-1"]
    assert not any(p.applies_to(api1) for p in st.authz.values())  # no tunnel enforces them
    b = wpx.build(st, st.waypoints["shop/wp"], "td", {"n2": "10.10.0.12"})
    ads.pack(ads.LDS, list(b.listeners.values()))  # valid RBAC
    hcm = b.listeners["svc|shop/api|80"]["filter_chains"][0]["filters"][0]["typed_config"]
    deny, allow = [f["typed_config"]["rules"] for f in hcm["http_filters"][:2]]
    assert deny["action"] == "DENY" and list(deny["policies"]) == ["shop.no-delete.0"]
    assert allow["action"] == "ALLOW"
    # the ipBlocks rule cannot be decided at a waypoint: in an ALLOW policy it never matches
    assert list(allow["policies"]) == ["shop.api-get.0", "shop.api-get.1"]
    first = allow["policies"]["shop.api-get.0"]
    assert first["principals"] == [{"filter_state": {"key": wpx.SOURCE_PRINCIPAL,
                                                     "string_match": {"exact": "spiffe://td/ns/shop/sa/web"}}}]  # fmt: skip
    perm = first["permissions"][0]["and_rules"]["rules"]
    assert perm[0] == {"and_rules": {"rules": [
        {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
        {"url_path": {"path": {"prefix": "/v1/"}}}]}}  # fmt: skip
    assert perm[1] == {"header": {"name": "x-team", "string_match": {"exact": "blue"}}}


def test_a_policy_on_a_service_no_waypoint_serves_stays_with_the_tunnels(tmp_path):
    """Fail closed: Istio would enforce it nowhere; here the tunnels enforce it at the
    service's pods, its L7 rules failing safe."""
    st = _load(tmp_path, BASE.replace("labels: {istio.io/use-waypoint: wp}", "labels: {}"), AUTHZ)
    placed = st.authz["shop/api-get@api"]
    assert placed.selector == {"app": "api"} and placed.target_refs == ()
    assert placed.applies_to(st.workloads["shop/api-1"])
    assert any("which no waypoint serves: the tunnels enforce it" in w for w in st.warnings)


HTTPROUTE = textwrap.dedent("""\
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: api, namespace: shop}
    spec:
      parentRefs: [{group: "", kind: Service, name: api}]
      rules:
      - matches: [{path: {type: PathPrefix, value: /v2}, method: GET}]
        backendRefs: [{name: api, port: 80}]
        timeouts: {request: 500ms}
      - backendRefs: [{name: api, port: 80, weight: 3}, {name: api, port: 80, weight: 1}]
""")


def test_an_httproute_is_read_into_the_routes_a_virtual_service_makes(tmp_path):
    st = _load(tmp_path, BASE, HTTPROUTE)
    (hr,) = st.routes()
    assert (hr.kind, hr.hosts) == ("HTTPRoute", ("shop/api",))
    first, second = hr.http
    assert first.matches[0].uri == routing.StringMatch("prefix", "/v2") and first.timeout == 0.5
    assert [d.weight for d in second.destinations] == [3, 1]  # relative, as the Gateway API says
    b = wpx.build(st, st.waypoints["shop/wp"], "td", {"n2": "10.10.0.12"})
    ads.pack(ads.LDS, list(b.listeners.values()))


@pytest.mark.parametrize("old,new,what", [
    ("kind: Service, name: api}]", "kind: Gateway, name: wp}]", "only a Service"),
    ("weight: 3}, {name: api, port: 80, weight: 1}", "weight: 0}", "every backend has weight 0"),
    ("name: api, port: 80}]\n    timeouts", "name: nope, port: 80}]\n    timeouts",
     "route to shop/nope, which is no service"),
    ("type: PathPrefix", "type: Glob", "path.type is one of"),
])  # fmt: skip
def test_bad_httproutes_are_refused_naming_file_and_line(tmp_path, old, new, what):
    with pytest.raises(RegistryError) as e:
        _load(tmp_path, BASE, HTTPROUTE.replace(old, new))
    assert str(e.value).startswith(f"{tmp_path / '1.yaml'}:") and what in str(e.value), str(e.value)
    # a VirtualService and an HTTPRoute for one service: which one routes it?
    with pytest.raises(RegistryError, match="already routed by"):
        _load(tmp_path, BASE, HTTPROUTE, RULE, ROUTE)


@pytest.mark.parametrize("kind,provider", [("zipkin", "envoy.tracers.zipkin"),
                                           ("otlp", "envoy.tracers.opentelemetry")])  # fmt: skip
def test_tracing_adds_a_collector_and_tags_each_span(tmp_path, kind, provider):
    st = _load(tmp_path, BASE, RULE, ROUTE)
    b = wpx.build(st, st.waypoints["shop/wp"], "td", {"n2": "10.10.0.12"},
                  wpx.Tracing("10.10.0.1:9411", 5.0, kind))  # fmt: skip
    ads.pack(ads.CDS, list(b.clusters.values()))
    ads.pack(ads.LDS, list(b.listeners.values()))
    assert b.clusters[kind]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"]["socket_address"] == {"address": "10.10.0.1", "port_value": 9411}  # fmt: skip
    hcm = b.listeners["svc|shop/api|80"]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["tracing"]["provider"]["name"] == provider
    assert hcm["tracing"]["random_sampling"] == {"value": 5.0}
    assert [t["tag"] for t in hcm["tracing"]["custom_tags"]] == [
        "waypoint", "destination.service", "source.principal", "source.forwarded"]  # fmt: skip
    # the tags' headers are the waypoint's: a client's own are overwritten
    assert {h["append_action"] for h in hcm["route_config"]["request_headers_to_add"]} == {
        "OVERWRITE_IF_EXISTS_OR_ADD"}  # fmt: skip


def test_a_label_alone_takes_no_pod_out_of_capture(tmp_path):
    """Waypoint pods are not captured (they speak HBONE themselves). An attacker's pod that
    carries the gateway-name label, without the waypoint's service account, or in another
    namespace, or naming no Gateway, stays captured."""
    forged = textwrap.dedent("""\
        ---
        apiVersion: dabbawala.io/v1
        kind: Workload
        metadata:
          name: evil-1
          namespace: shop
          labels: {gateway.networking.k8s.io/gateway-name: wp}
        spec: {serviceAccount: evil, node: n3, ip: 10.20.3.66}
        ---
        apiVersion: dabbawala.io/v1
        kind: Workload
        metadata:
          name: evil-2
          namespace: other
          labels: {gateway.networking.k8s.io/gateway-name: wp}
        spec: {serviceAccount: wp, node: n3, ip: 10.20.3.67}
        ---
        apiVersion: dabbawala.io/v1
        kind: Workload
        metadata:
          name: evil-3
          namespace: shop
          labels: {gateway.networking.k8s.io/gateway-name: nope}
        spec: {serviceAccount: nope, node: n3, ip: 10.20.3.68}
    """)
    st = _load(tmp_path, BASE + forged)
    assert st.waypoint_of_pod(st.workloads["shop/wp"]) == "shop/wp"  # the real one
    for key in ("shop/evil-1", "other/evil-2", "shop/evil-3"):
        assert st.waypoint_of_pod(st.workloads[key]) == "", key
    assert [w.key for w in st.waypoint_pods("shop/wp")] == ["shop/wp"]


def test_only_a_waypoints_pod_may_name_the_source_before_it():
    """The destination's tunnel records a Forwarded address as the flow's original source only
    from a waypoint's pod, connecting from its own address with its own identity, and only for
    a mesh workload's address (it is recorded, never used for policy)."""
    from collections import Counter
    from types import SimpleNamespace

    from agent.ztunnel.hbone_inbound import HboneInbound

    wp = SimpleNamespace(waypoint="shop/wp", spiffe_id="spiffe://td/ns/shop/sa/wp")
    web = SimpleNamespace(waypoint="", spiffe_id="spiffe://td/ns/shop/sa/web")
    t = HboneInbound()
    t.state = SimpleNamespace(by_ip={"10.20.3.11": wp, "10.20.1.5": web})
    t.stats = Counter()
    assert t._relayed("10.20.1.5", wp.spiffe_id, "10.20.3.11")  # the waypoint, for web
    assert not t._relayed("10.20.3.11", web.spiffe_id, "10.20.1.5")  # web is no waypoint
    assert not t._relayed("10.20.1.5", wp.spiffe_id, "10.20.9.9")  # not from its pod
    assert not t._relayed("10.20.1.5", web.spiffe_id, "10.20.3.11")  # not its identity
    assert not t._relayed("192.0.2.1", wp.spiffe_id, "10.20.3.11")  # no mesh workload
    assert t.stats["forwarded_by_waypoint"] == 1


@pytest.mark.parametrize("args,says", [
    (["--zipkin", "collector:9411"], "--zipkin: 'collector:9411' is not IPv4:PORT"),
    (["--otlp", "10.0.0.1"], "--otlp: '10.0.0.1' is not IPv4:PORT"),
    (["--zipkin", "10.0.0.1:9411", "--otlp", "10.0.0.1:4317"],
     "--zipkin and --otlp: a waypoint sends its spans to one collector"),
])  # fmt: skip
def test_a_bad_trace_collector_is_refused_before_serving(tmp_path, args, says):
    from click.testing import CliRunner

    from agent.cli import main

    mask = os.umask(0o022)
    try:  # (serve sets the daemon's umask first)
        r = CliRunner().invoke(main, ["control", "serve", "--state-dir", str(tmp_path / "s"),
                                      "--registry", str(tmp_path), *args])  # fmt: skip
    finally:
        os.umask(mask)
    assert r.exit_code != 0 and says in r.output, r.output
    assert not (tmp_path / "s").exists()  # nothing was started
