"""Waypoints (upstream Envoy, configured by our control plane over ADS): a service that opts in
with istio.io/use-waypoint is reached through its waypoint, HBONE on both hops, and its
VirtualService and DestinationRule route each request.

One lab of three nodes: the client on n1, the service's two versions on n2, the waypoint on
n3, so that both hops cross the lab's bridge. Real curl, real nginx, real Envoy.
"""

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from agent.lab import lab as labmod
from agent.lab import mesh, spec
from agent.lab.apps import start_http_app, start_nginx
from tests.conftest import REPO, spiffe, unique, wait_for, wait_port, write_registry

VIP = "10.96.0.60"
FLAKY = "10.96.0.61"  # the same pods, the HTTP app (apps.HTTP_APP) on 8081; n2-p2 sick
MARKER = "waypoint-marker-7c1f0e"
CANARY = [
    {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
     "metadata": {"name": "api", "namespace": "default"},
     "spec": {"host": "api", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                         {"name": "v2", "labels": {"version": "v2"}}]}},
    {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
     "metadata": {"name": "api", "namespace": "default"},
     "spec": {"hosts": ["api"], "http": [
         {"name": "canary-header", "match": [{"headers": {"x-canary": {"exact": "yes"}}}],
          "route": [{"destination": {"host": "api", "subset": "v2"}}]},
         {"name": "split", "route": [
             {"destination": {"host": "api", "subset": "v1"}, "weight": 90},
             {"destination": {"host": "api.default.svc.cluster.local", "subset": "v2"},
              "weight": 10}]}]}},
]  # fmt: skip


# A Zipkin collector stand-in (no real collector can be installed here): it keeps every span
# list POSTed to /api/v2/spans, one JSON document a line.
ZIPKIN = r"""
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
out = sys.argv[1]
class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_POST(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/api/v2/spans":
            with open(out, "ab") as f:
                f.write(body.replace(b"\n", b" ") + b"\n")
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()
HTTPServer(("10.10.0.1", 9411), H).serve_forever()
"""


# An OpenTelemetry collector stand-in (OTLP over gRPC; none can be installed here): it decodes
# each export with OpenTelemetry's own protos (from xds-protos) and keeps one span a line.
OTLP = r"""
import json, sys
from concurrent import futures
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
out = sys.argv[1]
def export(req, ctx):
    with open(out, "a") as f:
        for rs in req.resource_spans:
            res = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.instrumentation_library_spans:  # scope_spans (2) in newer protos
                for sp in ss.spans:
                    f.write(json.dumps({
                        "service": res.get("service.name"), "trace_id": sp.trace_id.hex(),
                        "span_id": sp.span_id.hex(), "parent": sp.parent_span_id.hex(),
                        "tags": {a.key: a.value.string_value for a in sp.attributes}}) + "\n")
    return ts.ExportTraceServiceResponse()
h = grpc.method_handlers_generic_handler(
    "opentelemetry.proto.collector.trace.v1.TraceService",
    {"Export": grpc.unary_unary_rpc_method_handler(
        export, request_deserializer=ts.ExportTraceServiceRequest.FromString,
        response_serializer=ts.ExportTraceServiceResponse.SerializeToString)})
s = grpc.server(futures.ThreadPoolExecutor(2))
s.add_generic_rpc_handlers((h,))
s.add_insecure_port("10.10.0.1:4317")
s.start()
s.wait_for_termination()
"""


@pytest.fixture(scope="module")
def wlab():
    sp = spec.default_spec(3, 1)  # n1-p1 (client), n2-p1 (v1), n3-p1
    sp.pods.append(spec.PodSpec("n2-p2", "n2"))
    for p in sp.pods:
        if p.node == "n2":
            p.labels = {"app": "api", "version": "v1" if p.name == "n2-p1" else "v2"}
    sp.services = [spec.ServiceSpec(name, vip, [spec.ServicePort(80, port)], {"app": "api"},
                                    labels={"istio.io/use-waypoint": "wp"})
                   for name, vip, port in (("api", VIP, 8080), ("flaky", FLAKY, 8081))] + [
        spec.ServiceSpec(f"api-{v}", f"10.96.0.{62 + i}", [spec.ServicePort(80, 8080)],
                         {"app": "api", "version": v})  # an HTTPRoute's backends
        for i, v in enumerate(("v1", "v2"))]  # fmt: skip
    sp.waypoints = [spec.WaypointSpec("wp", "n3")]
    name = unique("wp")
    L = labmod.up(name, sp)
    procs = []
    try:
        spans = os.path.join(mesh.paths(L)["root"], "spans.jsonl")
        procs.append(L.popen("lab", ["python3", "-c", ZIPKIN, spans],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        control = ("--zipkin", "10.10.0.1:9411", "--trace-sampling", "100")
        procs += list(mesh.up(L, capture=True, control_args=control).values())
        for pod in ("n2-p1", "n2-p2"):  # after the agents: their sockets are the mesh's
            procs.append(start_nginx(L, pod, 8080, f"/tmp/{name}-{pod}", text=f"{pod}\\n"))
            procs.append(start_http_app(L, pod, 8081, sick=pod == "n2-p2"))
        for pod in ("n2-p1", "n2-p2"):
            for port in (8080, 8081):
                wait_port(L, pod, L.pod(pod).ip, port)
        yield L, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        labmod.down(name, quiet=True)


def _get(L, n: int, *extra: str) -> collections.Counter:
    """n requests to the service on one connection (curl's URL globbing); which pod answered
    each, by its body."""
    r = L.run("n1-p1", ["curl", "-sS", "--max-time", "60", *extra, f"http://{VIP}/?n=[1-{n}]"],
              check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return collections.Counter(r.stdout.split())


def _codes(L, url: str, n: int, *extra: str) -> collections.Counter:
    """n requests (curl's URL globbing, one connection); their status codes."""
    r = L.run("n1-p1", ["curl", "-s", "--max-time", "120", "-o", "/dev/null", "-w",
                        "%{http_code}\\n", *extra, f"{url}?n=[1-{n}]"], check=False)  # fmt: skip
    return collections.Counter(r.stdout.split())


def _requests(L, since: int = 0) -> list[dict]:
    doc = json.loads(
        L.run("wp", ["curl", "-s", f"http://127.0.0.1:15020/requests?since={since}"]).stdout
    )
    return doc["requests"]


def _logged(L, since: int, n: int) -> list[dict]:
    """The requests after since, once the waypoint's access log brought n of them (Envoy sends
    its log in batches)."""
    return wait_for(lambda: (r := _requests(L, since)) and len(r) >= n and r, 15,
                    what=f"{n} requests in the waypoint's access log")  # fmt: skip


def _last_seq(L) -> int:
    """The last request the waypoint logged, once its log is quiet (Envoy sends it in
    batches: what an earlier step sent may still be on its way)."""
    last = -1
    while True:
        reqs = _requests(L)
        seq = reqs[-1]["seq"] if reqs else 0
        if seq == last:
            return seq
        last = seq
        time.sleep(0.5)


def _metrics(L) -> dict[tuple, float]:
    """istio_requests_total at the waypoint (15020), by (response_code, destination_version)."""
    text = L.run("wp", ["curl", "-s", "http://127.0.0.1:15020/stats/prometheus"]).stdout
    out: dict[tuple, float] = collections.defaultdict(float)
    for line in text.splitlines():
        if line.startswith("istio_requests_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            out[(labels["response_code"], labels["destination_version"])] += float(
                line.rsplit(" ", 1)[1]
            )
            assert labels["reporter"] == "waypoint"
    return out


def _metrics_after(L, before: dict, n: int) -> dict:
    """The waypoint's counts once its access log brought n more requests."""

    def more():
        m = _metrics(L)
        return m if sum(m.values()) - sum(before.values()) >= n else None

    return wait_for(more, 15, what=f"the waypoint's access log of {n} requests")


def _routing(L, docs) -> None:
    """Put docs in the registry and wait until the waypoint's Envoy runs what they make (the
    control plane says which registry state its configuration comes from)."""
    st0 = _control_status(L)
    write_registry(L, "routing", docs)

    def in_force():
        st = _control_status(L)
        if st["snapshot_version"] <= st0["snapshot_version"]:
            return None
        wp = next((w for w in st["waypoints"] if w["waypoint"] == "default/wp"), {})
        return wp.get("in_force_for", 0) >= st["snapshot_version"]

    wait_for(in_force, 20, what="the waypoint to run its new configuration")


def _clear_routing(L) -> None:
    if os.path.exists(os.path.join(mesh.paths(L)["registry"], "routing.yaml")):
        _routing(L, [])


def _accepted(L):
    st = _control_status(L)
    wp = next((w for w in st["waypoints"] if w["waypoint"] == "default/wp"), {})
    acc = wp.get("accepted") or {}
    return (acc["clusters"], acc["listeners"]) if "listeners" in acc else None


def _control_status(L) -> dict:
    r = subprocess.run([sys.executable, "-m", "agent.cli", "control", "status", "--state-dir",
                        mesh.paths(L)["control"], "-o", "json"],
                       capture_output=True, text=True)  # fmt: skip
    return json.loads(r.stdout)  # (it exits 1 while the registry's last change failed)


def _flows(L, node: str, *extra: str) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "agent.cli", "flows", "--node", f"{L.name}/{node}",
                        "-o", "json", *extra], capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(r.stdout)["flows"]


def test_an_opted_in_service_is_served_through_its_waypoint_and_counted_there(wlab):
    """Before: its connections were refused (this mesh ran no waypoint)."""
    L, _ = wlab
    before = _metrics(L)
    got = _get(L, 20)
    assert got == {"n2-p1": 10, "n2-p2": 10}, got  # Envoy's round robin over both
    after = _metrics_after(L, before, 20)
    assert after[("200", "unknown")] - before.get(("200", "unknown"), 0) == 20
    # the source as the tunnels' metrics name it: its pod, from the baggage its tunnel sent
    text = L.run("wp", ["curl", "-s", "http://127.0.0.1:15020/stats/prometheus"]).stdout
    srcs = {(d["source_workload"], d["source_workload_namespace"], d["source_principal"])
            for line in text.splitlines() if line.startswith("istio_requests_total{")
            for d in [dict(re.findall(r'(\w+)="([^"]*)"', line))]}  # fmt: skip
    assert srcs == {("n1-p1", "default", spiffe(L.pod("n1-p1")))}, srcs
    # the source's tunnel carried the connection to the waypoint, over HBONE
    fs = [f for f in _flows(L, "n1", "--state", "closed") if f["dst"]["ip"] == VIP]
    assert fs and all(f["path"] == "hbone" and f["dst"]["workload"] == "default/wp" for f in fs)
    assert fs[-1]["reason"] == "to waypoint default/wp (pod default/wp)"
    # the destination's tunnel saw the waypoint's identity as the peer, and the flow's source
    # before it (the waypoint forwarded it)
    ins = [f for f in _flows(L, "n2") if f["direction"] == "inbound"]  # Envoy keeps them open
    assert ins and {(f["src"]["identity"], f["src"]["workload"], f["src"]["original"]["workload"],
                     f["src"]["original"]["ip"]) for f in ins} == {
        ("spiffe://cluster.local/ns/default/sa/wp", "default/wp", "default/n1-p1",
         L.pod("n1-p1").ip)}, ins  # fmt: skip
    # the waypoint's node says its pod is not captured (dabba status)
    r = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--node", f"{L.name}/n3"],
                       capture_output=True, text=True)  # fmt: skip
    assert "waypoint pods, not captured: default/wp" in r.stdout, r.stdout
    # dabba requests: each with its source's identity and address, destination and status
    r = L.run("wp", [sys.executable, "-m", "agent.cli", "requests", "--waypoint", "127.0.0.1",
                     "-o", "json", "--limit", "20"], cwd=REPO)  # fmt: skip
    reqs = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(reqs) == 20 and {(q["source"]["principal"], q["source"]["address"], q["method"],
                                 q["status"], q["destination"]["service"]) for q in reqs} == {
        (spiffe(L.pod("n1-p1")), L.pod("n1-p1").ip, "GET", 200, "default/api")}, reqs  # fmt: skip
    assert sorted(q["destination"]["workload"] for q in reqs) == ["default/n2-p1"] * 10 + [
        "default/n2-p2"] * 10  # fmt: skip
    assert {q["source"]["workload"] for q in reqs} == {"default/n1-p1"}
    # its Envoy took its configuration with the waypoint's own certificate, not its node's
    # (Istio's waypoints too): the node's key is nowhere in its bootstrap
    with open(os.path.join(mesh.paths(L)["logs"], "control.log")) as f:
        assert "waypoint connected waypoint=default/wp node=n3 as=ns/default/sa/wp" in f.read()
    with open(os.path.join(mesh.paths(L)["root"], "waypoints", "default", "wp", "envoy.json")) as f:
        assert "node-key" not in f.read()


def test_canary_weights_and_a_header_match_route_each_request(wlab):
    L, _ = wlab
    try:
        _routing(L, CANARY)
        before = _metrics(L)
        got = _get(L, 2000)
        assert sum(got.values()) == 2000
        share = got["n2-p2"] / 2000 * 100
        assert 7 <= share <= 13, got  # 10% to v2, within 3 points
        after = _metrics_after(L, before, 2000)
        assert after[("200", "v2")] - before.get(("200", "v2"), 0) == got["n2-p2"]
        assert after[("200", "v1")] - before.get(("200", "v1"), 0) == got["n2-p1"]
        assert _get(L, 50, "-H", "x-canary: yes") == {"n2-p2": 50}
        assert _get(L, 50, "-H", "x-canary: no")["n2-p2"] < 50
    finally:
        _clear_routing(L)


def test_bad_routing_is_refused_with_its_place_and_the_last_good_stays(wlab):
    """Weights that do not sum to 100: the control plane names file and line, keeps the last
    good state, and the waypoint keeps routing by it."""
    L, _ = wlab
    try:
        _routing(L, CANARY)
        accepted = _accepted(L)
        bad = json.loads(json.dumps(CANARY))
        bad[1]["spec"]["http"][1]["route"][1]["weight"] = 20
        write_registry(L, "routing", bad)
        path = os.path.join(mesh.paths(L)["registry"], "routing.yaml")

        def refused():
            reg = _control_status(L)["registry"]
            return reg if path in (reg.get("last_error") or "") else None

        reg = wait_for(refused, 15, what="the control plane to refuse the document")
        assert re.search(re.escape(path) + r":\d+: the weights sum to 110, not 100",
                         reg["last_error"]), reg  # fmt: skip
        assert _get(L, 50, "-H", "x-canary: yes") == {"n2-p2": 50}  # the last good routing
        assert _accepted(L) == accepted
    finally:
        _clear_routing(L)


def test_no_plaintext_crosses_the_wire_on_either_hop(wlab, tmp_path):
    L, _ = wlab
    pcap = tmp_path / "br0.pcap"
    cap = L.popen("lab", ["tcpdump", "-i", "br0", "-U", "-w", str(pcap), "tcp"],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(1)
        r = L.run("n1-p1", ["curl", "-sS", "--max-time", "10", "-H", f"X-Marker: {MARKER}",
                            "--data-binary", MARKER * 50, f"http://{VIP}/"], check=False)  # fmt: skip
        assert r.returncode == 0 and r.stdout.strip() in ("n2-p1", "n2-p2"), r
        time.sleep(1)
    finally:
        cap.terminate()
        cap.wait(5)
    data = pcap.read_bytes()
    # both hops were on the wire (to the waypoint's pod on n3, to n2's tunnel), in TLS 1.3 ...
    for ip in (L.pod("wp").ip, L.node("n2").ip):
        assert bytes(map(int, ip.split("."))) in data, ip
    # (connections are pooled: no handshake here) TLS records to and from port 15008
    assert data.count(b"\x17\x03\x03") >= 4 and b"\x3a\xa0" in data  # 15008
    assert MARKER.encode() not in data  # ... never in plaintext


def test_the_waypoint_comes_back_after_envoy_dies_with_its_configuration(wlab):
    L, _ = wlab
    try:
        _routing(L, CANARY)
        st = json.loads(L.run("wp", ["curl", "-s", "http://127.0.0.1:15020/status"]).stdout)
        os.kill(st["envoy_pid"], signal.SIGKILL)  # the Envoy this test's lab started
        wait_for(lambda: json.loads(L.run("wp", ["curl", "-s", "http://127.0.0.1:15020/status"])
                                    .stdout)["ready"], 30, what="Envoy to be back")  # fmt: skip
        st2 = json.loads(L.run("wp", ["curl", "-s", "http://127.0.0.1:15020/status"]).stdout)
        assert (
            st2["envoy_pid"] != st["envoy_pid"]
            and st2["envoy_restarts"] == st["envoy_restarts"] + 1
        )
        assert _get(L, 20, "-H", "x-canary: yes") == {"n2-p2": 20}  # its routing came back
    finally:
        _clear_routing(L)


FLAKY_ROUTES = [
    {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
     "metadata": {"name": "flaky", "namespace": "default"},
     "spec": {"hosts": ["flaky"], "http": [
         {"name": "retried", "match": [{"uri": {"prefix": "/half"}}],
          "route": [{"destination": {"host": "flaky"}}],
          "retries": {"attempts": 3, "retryOn": "5xx"}},
         {"name": "timed", "match": [{"uri": {"prefix": "/slow"}}],
          "route": [{"destination": {"host": "flaky"}}], "timeout": "200ms"},
         {"name": "faulty", "match": [{"uri": {"prefix": "/fault"}}],
          "route": [{"destination": {"host": "flaky"}}],
          "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 50}}}},
         {"name": "rest", "route": [{"destination": {"host": "flaky"}}]}]}},
]  # fmt: skip


def test_retries_timeouts_and_fault_injection(wlab):
    L, _ = wlab
    try:
        _routing(L, FLAKY_ROUTES)
        # each pod fails every other request: 3 retries on 5xx hide every failure
        seq = _last_seq(L)
        assert _codes(L, f"http://{FLAKY}/half", 1000) == {"200": 1000}
        half = _logged(L, seq, 1000)
        assert len(half) == 1000 and sum(q["attempts"] > 1 for q in half) >= 400, half[-3:]
        # a 200 ms timeout against an endpoint that answers after 1 s
        r = L.run("n1-p1", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
                            f"http://{FLAKY}/slow"])  # fmt: skip
        code, took = r.stdout.split()
        assert code == "504" and float(took) < 1.0, r.stdout  # Envoy's, before the endpoint's
        assert _logged(L, seq + 1000, 1)[-1]["flags"] == "UT"
        # half the requests aborted by the fault filter, before any endpoint
        seq = _last_seq(L)
        got = _codes(L, f"http://{FLAKY}/fault", 400)
        assert sum(got.values()) == 400 and 140 <= got["503"] <= 260, got
        fi = [q for q in _logged(L, seq, 400) if q["status"] == 503]
        assert len(fi) == got["503"] and {q["flags"] for q in fi} == {"FI"}
        assert all(q["destination"]["workload"] == "" for q in fi)  # no endpoint saw them
    finally:
        _clear_routing(L)


def _breaker(max_conn: int, pending: int) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "flaky", "namespace": "default"},
            "spec": {"host": "flaky", "trafficPolicy": {"connectionPool": {
                "tcp": {"maxConnections": max_conn},
                "http": {"http1MaxPendingRequests": pending}}}}}  # fmt: skip


def test_circuit_breaking_and_outlier_detection(wlab):
    L, _ = wlab
    try:
        # one connection and one pending request: a burst of 1 s requests overflows
        _routing(L, [_breaker(1, 1)])
        seq = _last_seq(L)
        urls = [a for i in range(12) for a in ("-o", "/dev/null", f"http://{FLAKY}/slow?i={i}")]
        r = L.run("n1-p1", ["curl", "-s", "-w", "%{http_code}\\n", "--parallel",
                            "--parallel-immediate", "--parallel-max", "12", *urls], check=False)  # fmt: skip
        got = collections.Counter(r.stdout.split())
        assert sum(got.values()) == 12 and got["503"] >= 6 and got["200"] >= 1, got
        over = [q for q in _logged(L, seq, 12) if q["status"] == 503]
        assert len(over) == got["503"] and all("UO" in q["flags"] for q in over), over
        # a sick endpoint (n2-p2 answers /sick with 503) is ejected after its first 5xx
        _routing(L, [{**_breaker(100, 100), "spec": {"host": "flaky", "trafficPolicy": {
            "outlierDetection": {"consecutive5xxErrors": 1, "interval": "1s",
                                 "baseEjectionTime": "60s", "maxEjectionPercent": 100}}}}])  # fmt: skip
        assert _codes(L, f"http://{FLAKY}/sick", 10) == {"200": 10}  # retried to the well one
        seq = _last_seq(L)
        assert _codes(L, f"http://{FLAKY}/sick", 20) == {"200": 20}
        after = _logged(L, seq, 20)
        assert len(after) == 20 and {(q["destination"]["workload"], q["attempts"])
                                     for q in after} == {("default/n2-p1", 1)}, after  # fmt: skip
    finally:
        _clear_routing(L)


def _authz(rules: list[dict]) -> dict:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "api-http", "namespace": "default"},
            "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "api"}],
                     "action": "ALLOW", "rules": rules}}  # fmt: skip


def _status(L, pod: str, method: str) -> str:
    r = L.run(pod, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method,
                    "--max-time", "10", f"http://{VIP}/"])  # fmt: skip
    return r.stdout


def test_http_authorization_at_the_waypoint(wlab):
    """GET allowed and POST denied (403) for one principal, both allowed for another; a change
    applies to the next request. The policy targets the Service: the destination's tunnel
    does not apply it (the waypoint's identity would fail it there)."""
    L, _ = wlab
    one, other = spiffe(L.pod("n1-p1")), spiffe(L.pod("n3-p1"))
    rule_one = {"from": [{"source": {"principals": [one.removeprefix("spiffe://")]}}],
                "to": [{"operation": {"methods": ["GET", "HEAD"]}}]}  # fmt: skip
    rule_other = {"from": [{"source": {"principals": [other.removeprefix("spiffe://")]}}]}
    try:
        _routing(L, [_authz([rule_one, rule_other])])
        assert [_status(L, "n1-p1", m) for m in ("GET", "POST")] == ["200", "403"]
        assert [_status(L, "n3-p1", m) for m in ("GET", "POST")] == ["200", "200"]
        seq = _last_seq(L)
        _routing(L, [_authz([rule_one])])  # the other principal loses its rule
        assert _status(L, "n3-p1", "GET") == "403"
        assert _status(L, "n1-p1", "GET") == "200"
        denied = [q for q in _logged(L, seq, 2) if q["status"] == 403]
        assert [q["source"]["principal"] for q in denied] == [other], denied
    finally:
        _clear_routing(L)


HTTPROUTE = [
    {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
     "metadata": {"name": "api", "namespace": "default"},
     "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "api", "port": 80}],
              "rules": [
                  {"matches": [{"headers": [{"name": "x-canary", "value": "yes"}]}],
                   "backendRefs": [{"name": "api-v2", "port": 80}]},
                  {"backendRefs": [{"name": "api-v1", "port": 80, "weight": 90},
                                   {"name": "api-v2", "port": 80, "weight": 10}]}]}},
]  # fmt: skip


def test_an_httproute_routes_like_the_virtual_service(wlab):
    L, _ = wlab
    try:
        _routing(L, HTTPROUTE)
        got = _get(L, 2000)
        assert sum(got.values()) == 2000 and 7 <= got["n2-p2"] / 20 <= 13, got
        assert _get(L, 50, "-H", "x-canary: yes") == {"n2-p2": 50}
    finally:
        _clear_routing(L)


def test_a_trace_reaches_the_collector_and_b3_headers_reach_the_destination(wlab):
    """(The collector is the stand-in above: no real one can be installed here.)"""
    L, _ = wlab
    trace = "463ac35c9f6413ad48485a3953bb6124"
    r = L.run("n1-p1", ["curl", "-s", "-H", f"x-b3-traceid: {trace}", "-H",
                        "x-b3-spanid: a2fb4a1d1a96d312", "-H", "x-b3-sampled: 1",
                        f"http://{FLAKY}/headers"])  # fmt: skip
    seen = json.loads(r.stdout)
    assert seen["x-b3-traceid"] == trace and seen["x-b3-spanid"] != "a2fb4a1d1a96d312", seen
    spans_path = os.path.join(mesh.paths(L)["root"], "spans.jsonl")

    def span():
        if not os.path.exists(spans_path):
            return None
        with open(spans_path) as f:
            for line in filter(str.strip, f):
                for sp in json.loads(line):
                    if sp.get("traceId") == trace:
                        return sp
        return None

    sp = wait_for(span, 20, what="the waypoint's span at the collector")
    tags = sp["tags"]
    assert (tags["waypoint"], tags["destination.service"], tags["source.principal"],
            tags["http.status_code"]) == ("default/wp", "default/flaky", spiffe(L.pod("n1-p1")),
                                          "200"), sp  # fmt: skip
    assert tags["source.forwarded"] == f"for={L.pod('n1-p1').ip}"
    assert sp["id"] == seen["x-b3-spanid"] or sp["parentId"] == "a2fb4a1d1a96d312", sp


def test_the_waypoint_runs_as_its_kubernetes_deployment_runs_it(wlab):
    """deploy/kubernetes/waypoint: the pod sees the control plane's address, its own
    certificate's folder and the trust bundle, nothing else of its node's (no agent
    configuration, no node key); it serves with them, its Envoy connecting with its own
    certificate."""
    L, procs = wlab
    (sup,) = [p for p in procs if p.poll() is None and "waypoint" in p.args and "run" in p.args]
    sup.terminate()  # the supervisor this lab started; it stops its Envoy
    assert sup.wait(30) == 0
    with open(os.path.join(mesh.paths(L)["logs"], "control.log")) as f:
        before = f.read().count(
            "waypoint connected waypoint=default/wp node=n3 as=ns/default/sa/wp"
        )
    w = L.waypoints[0]
    cfg = os.path.join(mesh.paths(L)["root"], f"{w['node']}.yaml")
    procs.append(p := mesh.start_waypoint(L, w, cfg, own_files=True))
    wait_for(lambda: mesh.waypoint_ready(L, w), 60, what="the waypoint, run with its own files")
    assert "--config" not in p.args and "--certs" in p.args
    assert _get(L, 10) == {"n2-p1": 5, "n2-p2": 5}
    with open(os.path.join(mesh.paths(L)["logs"], "control.log")) as f:
        got = f.read().count("waypoint connected waypoint=default/wp node=n3 as=ns/default/sa/wp")
    assert got == before + 1


def _restart_control(L, procs, *args: str) -> None:
    """The lab's control plane (this module started it) again, with args; the agents and the
    waypoint reconnect to it."""
    (ctl,) = [p for p in procs if p.poll() is None and "control" in p.args and "serve" in p.args]
    ctl.terminate()
    assert ctl.wait(30) == 0
    procs.append(mesh.start_control(L, extra=args))


def test_with_an_otlp_collector_the_w3c_traceparent_is_carried_and_the_span_sent(wlab):
    """dabba control serve --otlp: the waypoints' Envoy traces with OpenTelemetry (the collector
    is the stand-in above)."""
    L, procs = wlab
    spans_path = os.path.join(mesh.paths(L)["root"], "otlp.jsonl")
    procs.append(L.popen("lab", [sys.executable, "-c", OTLP, spans_path],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
    trace, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    _restart_control(L, procs, "--otlp", "10.10.0.1:4317", "--trace-sampling", "100")
    try:

        def traced():
            r = L.run("n1-p1", ["curl", "-s", "--max-time", "5", "-H",
                                f"traceparent: 00-{trace}-{parent}-01", f"http://{FLAKY}/headers"],
                      check=False)  # fmt: skip
            tp = json.loads(r.stdout or "{}").get("traceparent", "")
            # the waypoint's Envoy continued the trace with a span of its own once it runs the
            # new configuration (before, the header passed untouched)
            return tp if tp.startswith(f"00-{trace}-") and parent not in tp else None

        tp = wait_for(traced, 60, interval=1, what="the waypoint to trace with OpenTelemetry")
        own = tp.split("-")[2]

        def span():
            if not os.path.exists(spans_path):
                return None
            with open(spans_path) as f:
                rows = [json.loads(x) for x in f if x.strip()]
            return next((r for r in rows if r["span_id"] == own), None)

        sp = wait_for(span, 30, what="the waypoint's span at the collector")
        assert (sp["trace_id"], sp["parent"], sp["service"]) == (trace, parent, "wp.default"), sp
        tags = sp["tags"]
        assert (tags["waypoint"], tags["destination.service"], tags["source.principal"],
                tags["source.forwarded"]) == ("default/wp", "default/flaky",
                                              spiffe(L.pod("n1-p1")), f"for={L.pod('n1-p1').ip}")  # fmt: skip
    finally:
        _restart_control(L, procs, "--zipkin", "10.10.0.1:9411", "--trace-sampling", "100")
