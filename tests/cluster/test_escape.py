"""No way around the mesh, end to end: the attacks of the "No way around the mesh" issue
against a meshed lab with real tunnels, each seen failing from the attacker's side and
counted or shown on the operator's side."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import (
    cgroup_procs,
    http_server,
    mesh_lab,
    popen_in_cgroup,
    tunnel_stats,
    wait_for,
)

MARKER = "mapped-plaintext-marker-7f3a"


@pytest.fixture(scope="module")
def elab():
    yield from mesh_lab("e", 2, 2, capture=True)


def _dabba_json(*args):
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", *args, "-o", "json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _curl(L, src, url, *extra):
    return L.run(src, ["curl", "-sS", "--max-time", "3", *extra, url], check=False)


def test_a_pod_reaches_neither_the_nodes_loopback_nor_its_addresses(elab, procs):
    """Before: `curl http://0.0.0.0:15000/config_dump` from a pod returned the tunnel's admin
    (the tunnel dialled 0.0.0.0 in the node's namespace, its loopback)."""
    L, _ = elab
    n1 = L.node("n1")
    before = tunnel_stats(L, "n1")
    for url in (
        "http://0.0.0.0:15000/config_dump",
        "http://[::ffff:0.0.0.0]:15000/config_dump",
        "http://127.0.0.1:15000/config_dump",
        "http://[::1]:15000/config_dump",
    ):  # the pod's own loopback, where nothing listens
        r = _curl(L, "n1-p1", url, "-v")
        assert r.returncode == 7 and "local_workloads" not in r.stdout, (url, r.stderr)
        assert "failed: Connection refused" in r.stderr, (url, r.stderr)
    for url in (
        f"http://{n1.gateway}:15000/config_dump",
        f"http://{n1.ip}:15020/metrics",
        f"http://[::ffff:{n1.ip}]:15021/healthz/ready",
    ):  # the node itself: refused in the kernel
        r = _curl(L, "n1-p1", url, "-v")
        assert r.returncode == 7 and "connect fail for" in r.stderr, (url, r.stderr)
        assert "Operation not permitted" in r.stderr, (url, r.stderr)
    after = tunnel_stats(L, "n1")
    assert after.get("passthrough", 0) == before.get("passthrough", 0)  # never reached it

    # the operator sees each refused connect, who tried it and why
    deadline = time.monotonic() + 10
    while True:
        rows = _dabba_json("flows", "--node", f"{L.name}/n1", "--verdict", "deny")["flows"]
        refused = [r for r in rows if r["reason"].startswith("refused in the kernel")]
        if len(refused) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    got = {
        (r["dst"]["ip"], r["dst"]["port"], r["src"]["workload"], r["path"], r["reason"])
        for r in refused
    }
    why = "refused in the kernel: the destination is "
    assert got == {
        (n1.gateway, 15000, "default/n1-p1", "denied", why + "one of the mesh's own ports"),
        (n1.ip, 15020, "default/n1-p1", "denied", why + "an address of the node itself"),
        (n1.ip, 15021, "default/n1-p1", "denied", why + "an address of the node itself"),
    }
    metrics = L.run("n1", ["curl", "-s", f"http://{n1.ip}:15020/metrics"]).stdout
    assert 'dabba_drops_total{reason="destination"} 3.0' in metrics
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", "--node", f"{L.name}/n1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "refused     destination 3" in r.stdout, r.stdout
    # and whether workloads' packet sockets are refused (the lab accepts a kernel that cannot)
    st = _dabba_json("status", "--node", f"{L.name}/n1")
    pk = st["datapath"]["packet_sockets"]
    if pk["refused"]:
        assert "packet      refused in the kernel (lsm/socket_create)" in r.stdout, r.stdout
    else:
        assert f"packet      NOT refused: {pk['detail']}" in r.stdout, r.stdout
        assert any("packet sockets are not refused" in w for w in st["warnings"]), st


def test_ipv4_mapped_across_nodes_is_mutual_tls_never_plaintext(elab, procs, tmp_path):
    """Before: an AF_INET6 socket to ::ffff:<pod on another node> crossed in plaintext."""
    L, _ = elab
    dst = L.pod("n2-p1")
    http_server(L, procs, dst, 8080)
    pcap = tmp_path / "br0.pcap"
    cap = L.popen(
        "lab", ["tcpdump", "-i", "br0", "-U", "-w", str(pcap), "tcp"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    procs.append(cap)
    time.sleep(1)
    r = _curl(L, "n1-p1", f"http://[::ffff:{dst.ip}]:8080/", "-H", f"X-Marker: {MARKER}")
    assert r.returncode == 0 and "Directory listing" in r.stdout, r.stderr
    time.sleep(1)
    cap.terminate()
    cap.wait(5)
    data = pcap.read_bytes()
    assert len(data) > 2000 and MARKER.encode() not in data
    assert b"\x00\x2b\x00\x02\x03\x04" in data  # TLS 1.3 ServerHello on the HBONE port
    rows = _dabba_json("flows", "--node", f"{L.name}/n1", "--workload", "default/n1-p1")["flows"]
    hb = [f for f in rows if f["dst"]["ip"] == dst.ip and f["dst"]["port"] == 8080]
    assert hb and all(
        (f["path"], f["security"], f["dst"]["identity"])
        == (
            "hbone",
            "mutual_tls",
            f"spiffe://cluster.local/ns/{dst.namespace}/sa/{dst.service_account}",
        )
        for f in hb
    ), hb


BIND = (
    "import socket, sys\n"
    "for a in sys.argv[1:]:\n"
    "    host, port = a.rsplit(':', 1)\n"
    "    host = host.strip('[]')\n"
    "    s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)\n"
    "    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
    "    try:\n"
    "        s.bind((host, int(port))); s.listen(8); print(a, 'bound')\n"
    "    except OSError as e:\n"
    "        print(a, e.strerror)\n"
)


def test_the_running_tunnels_ports_cannot_be_shared(elab, procs):
    """Before: every tunnel listener set SO_REUSEPORT, so a root process in the node's
    namespace joined 15001's group and took captured connections in plaintext."""
    L, _ = elab
    n1 = L.node("n1")
    addrs = [f"{n1.gateway}:15001", "0.0.0.0:15001", f"{n1.ip}:15008", "0.0.0.0:15008",
             f"[{n1.gateway6}]:15001", "[::]:15001"]  # fmt: skip
    r = L.run("n1", [sys.executable, "-c", BIND, *addrs])
    assert r.stdout.splitlines() == [f"{a} Address already in use" for a in addrs]
    ss = L.run("n1", ["ss", "-Hltn", "sport = :15001"]).stdout.splitlines()
    # one socket per address (IPv4, IPv6), shared by the tunnel's processes
    assert sorted(line.split()[3] for line in ss) == sorted(
        [f"{n1.gateway}:15001", f"[{n1.gateway6}]:15001"]
    ), ss
    status = _dabba_json("bpf", "status", "--node", n1.bpf_node)
    own = next(p for p in status["programs"] if p["name"] == "dabba_own_in")
    assert own["attached"] == 1  # and own.c holds the ports for it even while it restarts
    dst = L.pod("n2-p2")
    http_server(L, procs, dst, 8083)
    assert _curl(L, "n1-p1", f"http://{dst.ip}:8083/", "-o", "/dev/null").returncode == 0


def test_a_host_process_with_the_tunnels_address_is_not_the_tunnel(elab, procs):
    """Before: plain.c (and the guard) took any connection from a tunnel address as the
    tunnel's, so a host process in the node's namespace reached a PERMISSIVE pod straight,
    around the tunnel's 15006 and its policy. Now only the tunnel's own connections pass as
    the tunnel's: the host process goes through 15006 like any plaintext peer."""
    L, _ = elab
    n1, pod = L.node("n1"), L.pod("n1-p2")
    http_server(L, procs, pod, 8084)
    host = os.path.join(n1.cgroup, "_host")  # a host process: the node's namespace, not the tunnel
    os.makedirs(host, exist_ok=True)
    before = tunnel_stats(L, "n1").get("plain_inbound", 0)
    try:
        p = popen_in_cgroup(
            host,
            ["curl", "-sS", "--max-time", "3", "-o", "/dev/null", "-w", "%{http_code} %{local_ip}",
             f"http://{pod.ip}:8084/"],
            f"/run/netns/{n1.netns}",
        )  # fmt: skip
        out, err = p.communicate(timeout=30)
        assert out == f"200 {n1.gateway}", err  # from the tunnel's address...
        assert tunnel_stats(L, "n1").get("plain_inbound", 0) == before + 1  # ...through 15006
    finally:
        wait_for(lambda: not cgroup_procs(host), 5, what="the host process to exit")
        os.rmdir(host)


def test_unrecognised_tunnel_connections_are_refused_not_looped_and_the_agent_heals_it(elab, procs):
    """Without tunops.c on the tunnel's cgroup, plain.c would steer each of the tunnel's own
    deliveries back to its 15006, which delivers again: a loop. The tunnel refuses to deliver
    instead, and the agent attaches tunops.c again within 5 s."""
    L, agents = elab
    n1 = L.node("n1")
    # from the other node: n1's tunnel delivers it (a same-node flow goes direct, no tunnel)
    src, dst = L.pod("n2-p1"), L.pod("n1-p2")
    http_server(L, procs, dst, 8085)
    url = f"http://{dst.ip}:8085/"
    assert _curl(L, src.name, url, "-o", "/dev/null").returncode == 0
    pin = f"/sys/fs/bpf/dabba/{n1.bpf_node}/links/dabba_tun_ops"
    agent = agents["n1"]
    agent.send_signal(signal.SIGSTOP)  # the agent we started: it must not heal it yet
    try:
        os.unlink(pin)
        time.sleep(1.5)  # the tunnel looks every 0.5 s
        before = tunnel_stats(L, "n1")
        assert _curl(L, src.name, url, "-o", "/dev/null").returncode != 0
        after = tunnel_stats(L, "n1")
        assert after.get("not_recognised", 0) == before.get("not_recognised", 0) + 1
        assert after.get("plain_inbound", 0) == before.get("plain_inbound", 0)  # no loop
    finally:
        agent.send_signal(signal.SIGCONT)
    wait_for(lambda: os.path.exists(pin), 15, what="the agent to attach tunops.c again")
    time.sleep(1)
    assert _curl(L, src.name, url, "-o", "/dev/null").returncode == 0
