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
from agent.lab.apps import start_nginx
from tests.conftest import REPO, spiffe, unique, wait_for, wait_port, write_registry

VIP = "10.96.0.60"
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


@pytest.fixture(scope="module")
def wlab():
    sp = spec.default_spec(3, 1)  # n1-p1 (client), n2-p1 (v1), n3-p1
    sp.pods.append(spec.PodSpec("n2-p2", "n2"))
    for p in sp.pods:
        if p.node == "n2":
            p.labels = {"app": "api", "version": "v1" if p.name == "n2-p1" else "v2"}
    sp.services = [spec.ServiceSpec("api", VIP, [spec.ServicePort(80, 8080)], {"app": "api"},
                                    labels={"istio.io/use-waypoint": "wp"})]  # fmt: skip
    sp.waypoints = [spec.WaypointSpec("wp", "n3")]
    name = unique("wp")
    L = labmod.up(name, sp)
    procs = []
    try:
        procs += list(mesh.up(L, capture=True).values())
        for pod in ("n2-p1", "n2-p2"):  # after the agents: their sockets are the mesh's
            procs.append(start_nginx(L, pod, 8080, f"/tmp/{name}-{pod}", text=f"{pod}\\n"))
        for pod in ("n2-p1", "n2-p2"):
            wait_port(L, pod, L.pod(pod).ip, 8080)
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
    """Put docs in the registry and wait until the waypoint's Envoy accepted what they make."""
    before = _accepted(L)
    write_registry(L, "routing", docs)
    wait_for(lambda: _accepted(L) not in (before, None), 20,
             what="the waypoint to accept its new configuration")  # fmt: skip


def _clear_routing(L) -> None:
    if os.path.exists(os.path.join(mesh.paths(L)["registry"], "routing.yaml")):
        _routing(L, [])


def _accepted(L):
    st = _control_status(L)
    wp = next((w for w in st["waypoints"] if w["waypoint"] == "default/wp"), {})
    return (wp.get("accepted") or {}).get("listeners")


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
    # dabba requests: each with its source's identity and address, destination and status
    r = L.run("wp", [sys.executable, "-m", "agent.cli", "requests", "--waypoint", "127.0.0.1",
                     "-o", "json", "--limit", "20"], cwd=REPO)  # fmt: skip
    reqs = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(reqs) == 20 and {(q["source"]["principal"], q["source"]["address"], q["method"],
                                 q["status"], q["destination"]["service"]) for q in reqs} == {
        (spiffe(L.pod("n1-p1")), L.pod("n1-p1").ip, "GET", 200, "default/api")}, reqs  # fmt: skip
    assert sorted(q["destination"]["workload"] for q in reqs) == ["default/n2-p1"] * 10 + [
        "default/n2-p2"] * 10  # fmt: skip


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
