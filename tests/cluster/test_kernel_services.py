"""Services resolved in the kernel (issue "same-node kernel path", item 3), like Cilium's
socket-level load balancing: connect() to a VIP goes to an endpoint the kernel picked (round
robin, least connections, random; ejected endpoints skipped), straight to it when it is on the
node, through the tunnel with the endpoint already chosen when it is not. getpeername() gives
the VIP. The same-node tests stop the node's tunnel: no proxy takes part."""

import collections
import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from agent.lab import mesh
from tests.cluster.test_flows import sample, scrape
from tests.conftest import helper, mesh_lab, wait_for, wait_port, write_registry

WEB = ["n1-p2", "n1-p3", "n1-p4"]  # on the client's node (n1-p1)
VIP = "10.96.0.60"


@pytest.fixture(scope="module")
def klab():
    yield from mesh_lab("ks", 2, 4, capture=True)


def _kstatus(L, node="n1") -> dict:
    st = mesh.agent_status(L, node) or {}
    return st.get("kernel_services", {}).get("services", {})


def _stats(L) -> dict:
    from agent.bpf.control import DatapathControl
    from agent.bpf.loader import Datapath

    n = L.node("n1")
    return DatapathControl(Datapath(n.bpf_node, n.cgroup)).stats()


def _service(L, name, vip, selector, policy, target=9000):
    write_registry(L, name, [{
        "apiVersion": "dabbawala.io/v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"vip": vip, "selector": selector, "lbPolicy": policy,
                 "ports": [{"port": 80, "targetPort": target}]},
    }])  # fmt: skip


def _in_force(L, vip, policy, n):
    def ok():
        s = _kstatus(L).get(f"{vip}:80")
        return s and s["policy"] == policy and len(s["endpoints"]) == n and s

    return wait_for(ok, 20, what=f"{vip} ({policy}, {n} endpoints) in n1's kernel")


def _label(L, names, key, value):
    """Label the lab's workloads names with key=value in the registry (lab.yaml)."""
    path = os.path.join(mesh.paths(L)["registry"], "lab.yaml")
    with open(path) as f:
        docs = list(yaml.safe_load_all(f))
    for d in docs:
        if d["kind"] == "Workload" and d["metadata"]["name"] in names:
            d["metadata"]["labels"][key] = value
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump_all(docs, f, sort_keys=False)
    os.replace(path + ".tmp", path)


class Client:
    def __init__(self, L, procs, vip, pod="n1-p1"):
        self.p = L.popen(pod, [*helper("vipclient"), vip, "80"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        procs.append(self.p)

    def do(self, line: str) -> list[dict]:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        out = self.p.stdout.readline()
        assert out, self.p.stderr.read()
        return json.loads(out)

    def spread(self, n, hold=False) -> collections.Counter:
        return collections.Counter(
            r.get("name") or f"errno {r['errno']}"
            for r in self.do(f"open {n} {'hold' if hold else 'close'}")
        )


@pytest.fixture(scope="module")
def web(klab):
    L, _ = klab
    servers = {}
    for name in WEB + ["n2-p1"]:
        pod = L.pod(name)
        servers[name] = L.popen(name, ["socat", f"TCP-LISTEN:9000,bind={pod.ip},fork,reuseaddr",
                                       f"SYSTEM:echo {name}; sleep 60"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for name in servers:
        wait_port(L, name, L.pod(name).ip, 9000)
    _label(L, WEB, "tier", "web")
    _label(L, ["n2-p1"], "tier", "far")
    yield servers
    for p in servers.values():
        if p.poll() is None:
            p.kill()
            p.wait(5)


def test_a_vip_is_resolved_in_the_kernel_by_each_policy_with_the_tunnel_stopped(klab, web, procs):
    """Before: every connection to a VIP went to the tunnel, which picked an endpoint in Python
    (and getpeername() gave the tunnel's address). Now the kernel picks: with n1's tunnel
    stopped, round robin gives 10/10/10, least connections the endpoint with the fewest open
    connections (where round robin would take the next in turn), random spreads, and every
    client sees the VIP as its peer."""
    L, _ = klab
    _service(L, "web", VIP, {"tier": "web"}, "round_robin")
    _in_force(L, VIP, "round_robin", 3)
    before = _stats(L)
    pid = mesh.agent_status(L, "n1")["tunnel"]["pid"]
    c = Client(L, procs, VIP)
    os.kill(pid, signal.SIGSTOP)
    try:
        got = c.do("open 30 close")
        assert collections.Counter(r["name"] for r in got) == dict.fromkeys(WEB, 10)
        assert all(r["peer"] == [VIP, 80] for r in got), got  # not the endpoint, not a tunnel
        # the same turn order each time round
        assert [r["name"] for r in got[:6]] == [r["name"] for r in got[3:9]]

        _service(L, "web", VIP, {"tier": "web"}, "least_connections")
        _in_force(L, VIP, "least_connections", 3)
        wait_for(lambda: all(e["active"] == 0 for e in _kstatus(L)[f"{VIP}:80"]["endpoints"]),
                 10, what="the round-robin connections to be gone")  # fmt: skip
        assert c.spread(3, hold=True) == dict.fromkeys(WEB, 1)
        c.do("close n1-p3")
        wait_for(lambda: {e["ip"]: e["active"] for e in _kstatus(L)[f"{VIP}:80"]["endpoints"]}
                 [L.pod("n1-p3").ip] == 0, 10, what="n1-p3's connection to be closed")  # fmt: skip
        # in turn would be n1-p2 (4 connections so far); the fewest open are n1-p3's
        assert c.spread(1, hold=True) == {"n1-p3": 1}
        assert c.spread(3, hold=True) == dict.fromkeys(WEB, 1)
        # what the kernel counts, as `dabba status` shows it (the agent writes it every second)
        want = {L.pod(n).ip: 2 for n in WEB}
        wait_for(lambda: {e["ip"]: e["active"] for e in _kstatus(L)[f"{VIP}:80"]["endpoints"]}
                 == want, 10, what=f"open connections {want} in the kernel's count")  # fmt: skip

        _service(L, "web", VIP, {"tier": "web"}, "random")
        _in_force(L, VIP, "random", 3)
        got = c.spread(60)
        assert set(got) == set(WEB) and sum(got.values()) == 60 and min(got.values()) >= 5, got
    finally:
        os.kill(pid, signal.SIGCONT)
    after = _stats(L)
    assert after["svc_resolved"] - before["svc_resolved"] == 30 + 3 + 1 + 3 + 60
    assert after["direct"] - before["direct"] == 30 + 3 + 1 + 3 + 60
    assert after["captured"] == before["captured"]  # none went to the tunnel
    # dabba flows: each of the 30 round-robin flows is direct, names its service and endpoint
    r = subprocess.run([sys.executable, "-m", "agent.cli", "flows", "--node", f"{L.name}/n1",
                        "--service", "web", "--port", "9000", "-o", "json"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    fs = [f for f in json.loads(r.stdout)["flows"] if f["reporter"] == "source"]
    assert len(fs) == 30 + 3 + 1 + 3 + 60
    assert {(f["path"], f["security"], f["service"]) for f in fs} == {
        ("direct", "node_local", "default/web")
    }
    # Istio's connection counters count them, under the service
    m = scrape(L, "n1")
    opened = sample(m, "istio_tcp_connections_opened_total", reporter="source",
                    destination_workload="n1-p3", destination_service_name="web")  # fmt: skip
    assert opened >= 10 + 1 + 1 + 1  # round robin, least connections; random adds some


def test_a_dead_endpoint_is_ejected_after_exactly_n_failures(klab, web, procs):
    """A killed endpoint fails eject_after (3) connects, then is ejected and no client is sent
    to it; a second dead one is not ejected past the service's max_ejected share (half), and
    the kernel counts what it held back."""
    L, _ = klab
    vip = "10.96.0.61"
    _service(L, "dead", vip, {"tier": "web"}, "round_robin")
    _in_force(L, vip, "round_robin", 3)
    c = Client(L, procs, vip)
    web["n1-p4"].kill()
    web["n1-p4"].wait(5)
    before = _stats(L)
    got = c.spread(30)
    refused = "errno 111"  # ECONNREFUSED: the kernel's TCP, straight from the endpoint
    assert got[refused] == 3 and got["n1-p2"] + got["n1-p3"] == 27, got
    after = _stats(L)
    assert after["lb_failed"] - before["lb_failed"] == 3
    assert after["lb_ejected"] - before["lb_ejected"] == 1

    def ejected_s(name):  # as `dabba status` shows it (the agent writes it every second)
        eps = {e["ip"]: e for e in _kstatus(L)[f"{vip}:80"]["endpoints"]}
        return eps[L.pod(name).ip]["ejected_s"]

    wait_for(lambda: ejected_s("n1-p4") > 20, 10, what="n1-p4 ejected for 30 s in the status")
    # a second endpoint dies: ejecting it would put 2 of 3 out, over max_ejected (0.5)
    web["n1-p3"].kill()
    web["n1-p3"].wait(5)
    got = c.spread(12)
    assert got["n1-p2"] >= 6 and got[refused] >= 3, got
    final = _stats(L)
    assert final["lb_ejected"] == after["lb_ejected"]
    assert final["lb_eject_limit"] > after["lb_eject_limit"]
    assert ejected_s("n1-p3") == 0


def test_a_service_without_endpoints_is_refused_and_a_remote_endpoint_goes_over_hbone(
    klab, web, procs
):
    """No endpoint: ECONNREFUSED at connect(), and the refusal is in `dabba flows`. An endpoint
    on another node: through the tunnel (HBONE, mutual TLS) to the endpoint the kernel chose,
    the flow naming the service, the client seeing the VIP."""
    L, _ = klab
    _service(L, "none", "10.96.0.62", {"tier": "nobody"}, "round_robin")
    _service(L, "far", "10.96.0.63", {"tier": "far"}, "round_robin")
    _in_force(L, "10.96.0.62", "round_robin", 0)
    _in_force(L, "10.96.0.63", "round_robin", 1)
    before = _stats(L)
    assert Client(L, procs, "10.96.0.62").do("open 1 close") == [{"errno": 111}]
    got = Client(L, procs, "10.96.0.63").do("open 2 close")
    assert got == [{"name": "n2-p1", "peer": ["10.96.0.63", 80]}] * 2
    after = _stats(L)
    assert after["svc_no_endpoint"] - before["svc_no_endpoint"] == 1
    assert after["captured"] - before["captured"] == 2
    r = subprocess.run([sys.executable, "-m", "agent.cli", "flows", "--node", f"{L.name}/n1",
                        "--port", "80", "-o", "json"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    fs = json.loads(r.stdout)["flows"]
    denied = [f for f in fs if f["dst"]["ip"] == "10.96.0.62"]
    assert len(denied) == 1 and denied[0]["verdict"] == "deny"
    assert "no endpoint" in denied[0]["reason"]
    r = subprocess.run([sys.executable, "-m", "agent.cli", "flows", "--node", f"{L.name}/n1",
                        "--service", "far", "-o", "json"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    fs = [f for f in json.loads(r.stdout)["flows"] if f["reporter"] == "source"]
    assert len(fs) == 2
    assert {(f["path"], f["security"], f["dst"]["workload"]) for f in fs} == {
        ("hbone", "mutual_tls", "default/n2-p1")
    }
    # the operator sees who resolves each VIP, and the kernel's view of its endpoints
    r = subprocess.run([sys.executable, "-m", "agent.cli", "services", "--node", f"{L.name}/n1",
                        "-o", "json"], capture_output=True, text=True, check=True)  # fmt: skip
    far = next(s for s in json.loads(r.stdout)["services"] if s["service"] == "default/far")
    assert (far["resolved_by"], far["why_tunnel"]) == ("kernel", "")
    assert [e["ip"] for e in far["kernel"]["80"]["endpoints"]] == [L.pod("n2-p1").ip]
    r = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--node", f"{L.name}/n1"],
                       capture_output=True, text=True)  # fmt: skip
    assert "VIP ports resolved in the kernel" in r.stdout, r.stdout
    # the tunnel ejects by the node config's services section too, as the kernel does
    dump = json.loads(L.run("n1", ["curl", "-s", "http://127.0.0.1:15000/config_dump"]).stdout)
    assert dump["lb"] == {"eject_after": 3, "eject_time": 30.0, "max_ejected": 0.5, "retries": 2}
    assert "service without endpoint 1" in r.stdout, r.stdout


def test_a_vip_is_no_way_around_a_policy_that_denies_its_endpoint(klab, web, procs):
    """Attacker's side: a workload a DENY policy keeps from an endpoint tries it through the
    service's VIP instead. The kernel decides the connection as one to the endpoint it chose:
    refused at connect() (EPERM), naming the policy, and no byte reaches the endpoint."""
    from tests.cluster.test_same_node import _apply, _deny

    L, _ = klab
    _label(L, ["n1-p2"], "solo", "yes")
    _service(L, "solo", "10.96.0.64", {"solo": "yes"}, "round_robin")
    _in_force(L, "10.96.0.64", "round_robin", 1)
    c = Client(L, procs, "10.96.0.64")
    assert c.do("open 1 close") == [{"name": "n1-p2", "peer": ["10.96.0.64", 80]}]
    before = _stats(L)
    try:
        _apply(L, "deny-vip", [_deny("deny-vip", L.pod("n1-p1"), 9000)])
        assert c.do("open 2 close") == [{"errno": 1}] * 2  # EPERM, every time
    finally:
        _apply(L, "deny-vip", [])
    after = _stats(L)
    assert after["policy_refused"] - before["policy_refused"] == 2
    assert after["svc_resolved"] - before["svc_resolved"] == 2
    r = subprocess.run([sys.executable, "-m", "agent.cli", "flows", "--node", f"{L.name}/n1",
                        "--port", "9000", "--verdict", "deny", "-o", "json"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    fs = json.loads(r.stdout)["flows"]
    assert len(fs) == 2 and {f["policy"] for f in fs} == {"default/deny-vip"}
    assert {f["dst"]["workload"] for f in fs} == {"default/n1-p2"}


def test_a_service_that_opts_into_a_waypoint_is_refused_saying_why_until_it_opts_out(
    klab, web, procs
):
    """istio.io/use-waypoint on a Service, while this mesh runs no waypoint: before, the label
    was dropped and the VIP's connections went straight to its endpoints, without the L7
    routing and policies the operator opted into (the complaint users have of Istio). Now the
    service reaches the node without endpoints: connect() is refused (ECONNREFUSED), and the
    flow, `dabba services` and the control plane say which waypoint and why. Opting out
    (use-waypoint: none) carries it at L4 again."""
    L, _ = klab
    _label(L, ["n1-p2"], "wp", "yes")  # an endpoint the tests before leave alive

    def service(label):
        write_registry(L, "wp", [{
            "apiVersion": "dabbawala.io/v1", "kind": "Service",
            "metadata": {"name": "wp", "namespace": "default",
                         "labels": {"istio.io/use-waypoint": label}},
            "spec": {"vip": "10.96.0.65", "selector": {"wp": "yes"},
                     "ports": [{"port": 80, "targetPort": 9000}]},
        }])  # fmt: skip

    service("edge")
    _in_force(L, "10.96.0.65", "round_robin", 0)
    c = Client(L, procs, "10.96.0.65")
    assert c.do("open 2 close") == [{"errno": 111}] * 2
    why = "service default/wp opts into waypoint default/edge (istio.io/use-waypoint)"
    r = subprocess.run([sys.executable, "-m", "agent.cli", "flows", "--node", f"{L.name}/n1",
                        "--verdict", "deny", "-o", "json"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    fs = [f for f in json.loads(r.stdout)["flows"] if f["dst"]["ip"] == "10.96.0.65"]
    assert len(fs) == 2 and all(why in f["reason"] for f in fs), fs
    assert "and no Gateway (class istio-waypoint) defines it" in fs[0]["reason"]
    r = subprocess.run([sys.executable, "-m", "agent.cli", "services", "--node", f"{L.name}/n1"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    assert "opts into waypoint default/edge" in r.stdout, r.stdout
    service("none")
    _in_force(L, "10.96.0.65", "round_robin", 1)
    assert c.do("open 2 close") == [{"name": "n1-p2", "peer": ["10.96.0.65", 80]}] * 2
