"""No way around the mesh, tried from inside an enrolled pod as an attacker would.

Every address family and spelling of a destination, datagrams and raw sockets,
and the ways into a STRICT or PERMISSIVE pod that are not IPv4 TCP. Each test
fails on the programs before the fix (named in its docstring).
"""

import json
import os
import subprocess
import sys

import pytest

from agent.bpf import abi
from agent.bpf.control import cgroup_id
from agent.bpf.flows import FlowSource
from agent.node.addresses import MESH_PORTS, unmapped
from tests.conftest import (
    REPO,
    cgroup_procs,
    helper,
    maps_dir,
    popen_in_cgroup,
    read_json,
    stub_tunnel,
    wait_for,
)

# one line each: what a server in a pod or node got; answers with its name
SERVER = (
    "import socket,sys,threading\n"
    "name, port = sys.argv[1], int(sys.argv[2])\n"
    "t = socket.socket(socket.AF_INET6); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "t.bind((sys.argv[3], port)); t.listen(64)\n"
    "u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.bind((sys.argv[3], port))\n"
    "def udp():\n"
    "    while True:\n"
    "        d, a = u.recvfrom(2048); print('udp', d.decode(), a[1], flush=True)\n"
    "threading.Thread(target=udp, daemon=True).start()\n"
    "print('listening', flush=True)\n"
    "while True:\n"
    "    c, a = t.accept(); c.sendall(name.encode()); c.close()\n"
)


def _server(lab, procs, target: str, name: str, port: int, bind: str = "::"):
    p = lab.popen(
        target,
        [sys.executable, "-c", SERVER, name, str(port), bind],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(p)
    wait_for(lambda: p.stdout.readline().strip() == "listening", 10, what=f"server in {target}")
    return p


def probe(lab, target: str, tries: list[dict]) -> list[str]:
    r = lab.run(target, [*helper("probe"), json.dumps(tries)], timeout=120)
    return [json.loads(line)["result"] for line in r.stdout.splitlines()]


def _tcp(host, port, family=4, timeout=3.0, send=None):
    t = {"op": "tcp", "host": host, "port": port, "family": family, "timeout": timeout}
    if send:
        t["send"] = send
    return t


def _delta(ctl, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in ctl.stats().items() if v != before.get(k, 0)}


def _link_local(lab, target: str, dev: str = "eth0") -> str:
    r = lab.run(target, ["ip", "-j", "-6", "addr", "show", "dev", dev, "scope", "link"])
    # (ip -j lists the addresses the scope filter left out as empty objects)
    return next(a["local"] for a in json.loads(r.stdout)[0]["addr_info"] if "local" in a)


def _node_addresses(lab, node: str) -> list[str]:
    code = (
        f"import sys, json; sys.path.insert(0, {REPO!r}); "
        "from agent.node.addresses import node_addresses; print(json.dumps(node_addresses()))"
    )
    return json.loads(lab.run(node, [sys.executable, "-c", code]).stdout)


@pytest.fixture
def enrolled(lab, datapaths):
    """n1-p1 enrolled and captured, the node's addresses and the mesh's ports set, as the
    agent sets them; undone afterwards."""
    pod, ctl = lab.pod("n1-p1"), datapaths["n1"]
    ctl.set_node_addrs(_node_addresses(lab, "n1"))
    ctl.set_mesh_ports(list(MESH_PORTS))
    ctl.enrol(pod.cgroup, 1, abi.WL_CAPTURE | abi.WL_ACCOUNT)
    try:
        yield pod, ctl
    finally:
        ctl.unenrol(pod.cgroup)
        ctl.set_exclusions([], [])
        ctl.configure(lab.node("n1").gateway, 15001)


def test_loopback_and_unspecified_stay_in_the_pods_own_namespace(lab, procs, enrolled):
    """Before: connect4 captured 0.0.0.0, and the tunnel dialled it in the node's namespace,
    where it is the node's loopback (its admin on 127.0.0.1:15000). Now every spelling of
    loopback and unspecified, in both families, reaches the pod's own listener."""
    pod, ctl = enrolled
    _server(lab, procs, "n1", "node-admin", 15000, bind="::ffff:127.0.0.1")
    _server(lab, procs, pod.name, "pod-itself", 15000)
    before = ctl.stats()
    spellings = [
        ("0.0.0.0", 4), ("127.0.0.1", 4), ("127.1.2.3", 4), ("0.1.2.3", 4), ("::", 6),
        ("::1", 6), ("::ffff:127.0.0.1", 6), ("::ffff:0.0.0.0", 6),
    ]  # fmt: skip
    got = probe(lab, pod.name, [_tcp(h, 15000, f, send="x") for h, f in spellings])
    want = ["connected pod-itself"] * len(spellings)
    want[3] = "error ENETUNREACH"  # 0.1.2.3: the pod's kernel has no route for 0/8 but 0.0.0.0
    assert got == want, list(zip(spellings, got, strict=True))
    d = _delta(ctl, before)
    assert d.get("local") == len(spellings) and "captured" not in d, d


def test_node_link_local_mesh_ports_and_ipv6_are_refused_counted_and_reported(lab, procs, enrolled):
    """Before: these were captured (the tunnel would dial the node itself or its link) or,
    through AF_INET6, not hooked at all (plaintext, no identity, no record)."""
    pod, ctl = enrolled
    n1, n2p1 = lab.node("n1"), lab.pod("n2-p1")
    tries = [
        (_tcp(n1.ip, 22), abi.Refusal.NODE),
        (_tcp(n1.gateway, 8080), abi.Refusal.NODE),
        (_tcp(n1.gateway, 15001), abi.Refusal.MESH_PORT),  # the capture listener itself
        (_tcp(n2p1.ip, 15008), abi.Refusal.MESH_PORT),
        (_tcp("169.254.169.254", 80), abi.Refusal.LINK_LOCAL),
        (_tcp(f"::ffff:{n1.ip}", 22, 6), abi.Refusal.NODE),
        (_tcp("::ffff:169.254.1.1", 80, 6), abi.Refusal.LINK_LOCAL),
        (_tcp(f"::ffff:{n2p1.ip}", 15006, 6), abi.Refusal.MESH_PORT),
        (_tcp("fe80::1%eth0", 80, 6), abi.Refusal.LINK_LOCAL),
        (_tcp(f"{_link_local(lab, 'n1', 'cbr0')}%eth0", 80, 6), abi.Refusal.LINK_LOCAL),
        (_tcp("2001:db8::1", 80, 6), abi.Refusal.IPV6),
        (_tcp("64:ff9b::a14:20b", 80, 6), abi.Refusal.IPV6),  # NAT64 spelling of n2-p1
    ]
    src = FlowSource(maps_dir(n1))
    try:
        list(src.closed())  # what earlier tests left in the ring
        before = ctl.stats()
        got = probe(lab, pod.name, [t for t, _ in tries])
        assert got == ["error EPERM"] * len(tries), list(zip(tries, got, strict=True))
        d = _delta(ctl, before)
        assert d == {"dst_refused": 10, "v6_refused": 2}, d
        recs = [r for r in src.closed(200) if r.cgroup_id == cgroup_id(pod.cgroup)]
    finally:
        src.close()
    assert len(recs) == len(tries)
    for rec, (t, why) in zip(recs, tries, strict=True):
        assert rec.refused == abi.REFUSAL_REASONS[why], (t, rec)
        assert (rec.close, rec.direction, rec.bytes_sent, rec.captured) == (
            "refused", "outbound", 0, False,
        )  # fmt: skip
        # the record holds the whole address, either family (16 bytes; IPv4-mapped as IPv4)
        host = t["host"].split("%")[0]
        assert rec.orig_dst == (unmapped(host), t["port"]), (t, rec.orig_dst)


def test_exclusions_go_direct_but_never_to_a_mesh_port(lab, procs, enrolled):
    pod, ctl = enrolled
    n1 = lab.node("n1")
    _server(lab, procs, "n1", "node-service", 9090)
    ctl.set_exclusions([f"{n1.ip}/32"], [])
    got = probe(lab, pod.name, [_tcp(n1.ip, 9090, send="x"), _tcp(n1.ip, 15001)])
    assert got == ["connected node-service", "error EPERM"]


def test_ipv4_mapped_connect_is_captured_exactly_like_ipv4(lab, procs, enrolled):
    """Before: an AF_INET6 socket to ::ffff:<pod on another node> was not hooked: it went
    straight there, in plaintext, with no identity and no flow record."""
    pod, ctl = enrolled
    n1, server = lab.node("n1"), lab.pod("n2-p1")
    stub = stub_tunnel(lab, procs, n1)
    before = ctl.stats()
    got = probe(
        lab, pod.name, [_tcp(f"::ffff:{server.ip}", 8080, 6, send="GET / HTTP/1.0\r\n\r\n")]
    )
    assert got[0].startswith("connected HTTP/1.1 200 OK"), got
    rec = read_json(stub, "found")
    assert (rec["found"], rec["orig_ip"], rec["orig_port"]) == (True, server.ip, 8080)
    assert rec["cgroup_id"] == cgroup_id(pod.cgroup) and rec["peer"][0] == pod.ip
    assert _delta(ctl, before).get("captured") == 1


def test_only_dns_leaves_by_udp_and_raw_sockets_are_refused(lab, procs, enrolled):
    """Before: UDP and raw sockets of an enrolled pod went anywhere, outside the mesh."""
    pod, ctl = enrolled
    server = lab.pod("n2-p1")
    srv = _server(lab, procs, server.name, "udp-server", 9999)
    dns = _server(lab, procs, server.name, "dns-server", 53)
    udp = [
        {"op": "udp_sendto", "host": server.ip, "port": 9999, "send": "a"},
        {"op": "udp_connect", "host": server.ip, "port": 9999, "send": "b"},
        {"op": "udp_sendto", "host": f"::ffff:{server.ip}", "port": 9999, "family": 6, "send": "c"},
        {"op": "udp_sendto", "host": server.ip, "port": 53, "send": "dns"},
        {"op": "socket", "type": "raw"},
        {"op": "socket", "type": "raw6"},
    ]
    before = ctl.stats()
    got = probe(lab, pod.name, udp)
    assert got == ["error EPERM"] * 3 + ["sent"] + ["error EPERM"] * 2, got
    assert _delta(ctl, before) == {"proto_refused": 5}
    assert dns.stdout.readline().split()[:2] == ["udp", "dns"]

    # capture.non_tcp: pass lets them out, unmeshed, as Istio's ambient mode does
    ctl.configure(lab.node("n1").gateway, 15001, pass_non_tcp=True)
    assert probe(lab, pod.name, udp[:1] + udp[4:]) == ["sent", "created", "created"]
    assert srv.stdout.readline().split()[:2] == ["udp", "a"]  # the refused b and c never came


def test_packet_sockets_are_refused_in_the_kernel_or_the_agent_does_not_start(
    lab, procs, enrolled, tmp_path
):
    """Before: an enrolled pod holding CAP_NET_RAW opened AF_PACKET sockets (no cgroup hook
    sees one) and could write frames of its own, around the mesh. Now lsm/socket_create
    (family.c) refuses them where the kernel runs BPF LSM programs (the Vagrant guests boot
    with lsm=...,bpf: vagrant/e2e.py checks it there). Where the kernel cannot (this
    machine's refuses LSM programs), the agent with its default config does not start, and
    says why and what to do."""
    import yaml

    from agent.lab import lab as labmod

    pod, ctl = enrolled
    refused, how = ctl.packet_sockets_refused()
    tries = [{"op": "socket", "type": t} for t in ("packet", "packet_dgram", "sock_packet")]
    allowed = [{"op": "socket", "type": t} for t in ("unix", "netlink")]
    before = ctl.stats()
    got = probe(lab, pod.name, tries + allowed)
    if refused:
        assert how == "refused in the kernel (lsm/socket_create)"
        assert got == ["error EPERM"] * 3 + ["created"] * 2, got
        assert _delta(ctl, before) == {"family_refused": 3, "family_seen": 3}
        assert probe(lab, "n1", tries) == ["created"] * 3  # the node is no workload
        ctl.configure(lab.node("n1").gateway, 15001, pass_non_tcp=True)  # capture.non_tcp: pass
        assert probe(lab, pod.name, tries) == ["created"] * 3
        return
    # this kernel cannot refuse them: say so, and refuse to enrol anything by default
    assert got == ["created"] * 5, got
    assert "BPF LSM" in how, how
    cfg = labmod.agent_config(lab, "n1")
    del cfg["capture"]["packet_sockets"]  # the default: refuse
    cfg["workloads"] = []
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = lab.run("n1", [sys.executable, "-m", "agent.cli", "agent", "run", "--config", str(path)],
                check=False, timeout=120)  # fmt: skip
    assert r.returncode != 0
    assert "this kernel cannot refuse packet sockets to workloads" in r.stderr, r.stderr
    assert "capture.packet_sockets: refuse-where-able" in r.stderr, r.stderr
    assert ctl.dp.status().healthy()  # it left the node's datapath as it was


def test_strict_pod_takes_no_ipv6_and_no_plaintext_udp_but_its_own_and_dns(lab, datapaths, procs):
    """Before: the guard looked at IPv4 TCP only. A STRICT pod answered over IPv6 link-local
    and took any UDP; and it dropped its own loopback connections."""
    strict, peer = lab.pod("n2-p2"), lab.pod("n2-p1")  # one bridge: link-local reaches it
    ctl = datapaths["n2"]
    srv = _server(lab, procs, strict.name, "strict-pod", 8086)
    ll = _link_local(lab, strict.name)
    ctl.enrol(strict.cgroup, 7, abi.WL_ACCOUNT | abi.WL_STRICT)
    before = ctl.stats()
    try:
        got = probe(lab, peer.name, [
            _tcp(f"{ll}%eth0", 8086, 6, timeout=2, send="x"),
            {"op": "udp_sendto", "host": strict.ip, "port": 8086, "send": "plain"},
            {"op": "udp_sendto", "host": f"{ll}%eth0", "port": 8086, "family": 6, "send": "ll"},
        ])  # fmt: skip
        assert got == ["timeout", "sent", "sent"]
        own = probe(lab, strict.name, [
            _tcp("127.0.0.1", 8086, send="x"), _tcp("::1", 8086, 6, send="x"),
            _tcp(strict.ip, 8086, send="x"),
            {"op": "udp_sendto", "host": "::1", "port": 8086, "family": 6, "send": "self"},
        ])  # fmt: skip
        assert own == ["connected strict-pod"] * 3 + ["sent"]
        assert srv.stdout.readline().split()[:2] == ["udp", "self"]  # not "plain", not "ll"
        d = _delta(ctl, before)
        assert (
            d["guard_drop"] >= 3 and d["guard_drop"] == ctl.guard_drops()[cgroup_id(strict.cgroup)]
        )
    finally:
        ctl.unenrol(strict.cgroup)
    assert probe(lab, peer.name, [_tcp(f"{ll}%eth0", 8086, 6, send="x")]) == [
        "connected strict-pod"
    ]


def test_permissive_pod_takes_no_ipv6_plaintext_around_the_tunnel(lab, datapaths, procs):
    """Before: plain.c steered IPv4 only, so IPv6 reached a PERMISSIVE pod around the
    tunnel's 15006 and its policy."""
    pod, peer = lab.pod("n1-p2"), lab.pod("n1-p1")
    ctl = datapaths["n1"]
    _server(lab, procs, pod.name, "permissive-pod", 8087)
    ll = _link_local(lab, pod.name)
    assert probe(lab, peer.name, [_tcp(f"{ll}%eth0", 8087, 6, send="x")]) == [
        "connected permissive-pod"
    ]
    before = ctl.stats()
    assert ctl.steer_plaintext(f"/run/netns/{pod.netns}")
    try:
        got = probe(lab, peer.name, [_tcp(f"{ll}%eth0", 8087, 6, timeout=2, send="x")])
        assert got == ["error ECONNREFUSED"]
        assert probe(lab, pod.name, [_tcp("::1", 8087, 6, send="x")]) == [
            "connected permissive-pod"
        ]
        assert _delta(ctl, before) == {"plain_v6_drop": 1}
    finally:
        ctl.unsteer_plaintext(set())


HIJACK = (
    "import socket,sys,time\n"
    "socks = []\n"
    "for addr in sys.argv[1:]:\n"
    "    host, port = addr.rsplit(':', 1)\n"
    "    for _ in range(16):\n"
    "        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
    "        s.bind((host, int(port))); s.listen(64); s.settimeout(0.05); socks.append(s)\n"
    "print('listening', len(socks), flush=True)\n"
    "got, end = 0, time.monotonic() + 8\n"
    "while time.monotonic() < end:\n"
    "    for s in socks:\n"
    "        try:\n"
    "            s.accept()[0].close(); got += 1\n"
    "        except OSError:\n"
    "            pass\n"
    "print('accepted', got, flush=True)\n"
)


def test_the_tunnels_ports_go_to_its_own_socket_and_nowhere_while_it_is_down(lab, datapaths, procs):
    """Before: a root process in the node's namespace bound 15001 with SO_REUSEPORT and got
    pods' captured connections in plaintext (the tunnel's listeners shared their ports). Now
    own.c (sk_lookup) gives the capture and HBONE ports to the socket the tunnel registered
    and to no other, and refuses them while none is registered (a tunnel restart)."""
    n1, n2, pod, server = lab.node("n1"), lab.node("n2"), lab.pod("n1-p1"), lab.pod("n2-p1")
    ctl = datapaths["n1"]
    ctl.configure(n1.gateway, 15001, hbone_port=15008)
    ctl.set_mesh_ports(list(MESH_PORTS))
    ctl.enrol(pod.cgroup, 9, abi.WL_CAPTURE | abi.WL_ACCOUNT)
    assert ctl.own_listeners(f"/run/netns/{n1.netns}")
    own = next(p for p in ctl.dp.programs if p.function == "dabba_own_in")
    try:
        # the tunnel is down: a hijacker takes 15001 and 15008 (32 sockets) while nothing holds them
        hijack = lab.popen(
            "n1",
            [sys.executable, "-c", HIJACK, f"{n1.gateway}:15001", f"{n1.ip}:15008"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(hijack)
        line = hijack.stdout.readline()
        assert line.split() == ["listening", "32"], line or hijack.stderr.read()
        before = ctl.stats()
        first = probe(lab, pod.name, [_tcp(server.ip, 8080, send="GET / HTTP/1.0\r\n\r\n")])
        hb = probe(lab, "n2", [_tcp(n1.ip, 15008)])
        assert first == ["error ECONNREFUSED"] and hb == ["error ECONNREFUSED"]
        d = _delta(ctl, before)
        assert d == {"own_no_tunnel": 2, "captured": 1, "flow_opened": 1, "flow_closed": 1}, d

        # the tunnel is back (on any port: sk_lookup does not care): it gets them all
        stub = stub_tunnel(lab, procs, n1, f"{n1.gateway}:0", "--count", "2", "--register")
        got = probe(lab, pod.name, [_tcp(server.ip, 8080, send="GET / HTTP/1.0\r\n\r\n")])
        assert got[0].startswith("connected HTTP/1.1 200 OK"), got
        rec = read_json(stub, "found")
        assert (rec["found"], rec["orig_ip"], rec["orig_port"]) == (True, server.ip, 8080)
        assert probe(lab, "n2", [_tcp(n1.ip, 15008, send="x")])[0].startswith("connected HTTP")
        assert read_json(stub, "found")["peer"][0] == n2.ip
        assert hijack.stdout.readline().split() == ["accepted", "0"]
    finally:
        ctl.unenrol(pod.cgroup)
        ctl.configure(n1.gateway, 15001)
        os.unlink(own.link_pin)


def test_only_the_tunnels_own_connections_pass_as_the_tunnels(lab, datapaths, procs):
    """Before: the guard and the steering took any connection from a tunnel address as the
    tunnel's; on a host install that is the node's address, so every host process (kubelet,
    host-network pods, masqueraded NodePort traffic) reached STRICT workloads in plaintext and
    skipped PERMISSIVE workloads' policy. Now only connections the tunnel's cgroup opened
    (recorded by tunops.c) pass, from the same address."""
    n2, strict, permissive = lab.node("n2"), lab.pod("n2-p2"), lab.pod("n2-p1")
    ctl = datapaths["n2"]
    _server(lab, procs, strict.name, "strict-pod", 8091)
    _server(lab, procs, permissive.name, "permissive-pod", 8092)
    intruder = os.path.join(os.path.dirname(n2.cgroup), "_intruder")  # a host process
    os.makedirs(intruder, exist_ok=True)
    tries = json.dumps([_tcp(strict.ip, 8091, timeout=2, send="x"),
                        _tcp(permissive.ip, 8092, timeout=2, send="x")])  # fmt: skip
    ctl.enrol(strict.cgroup, 31, abi.WL_ACCOUNT | abi.WL_STRICT)
    ctl.enrol(permissive.cgroup, 32, abi.WL_ACCOUNT)
    assert ctl.steer_plaintext(f"/run/netns/{permissive.netns}")
    try:
        before = ctl.stats()
        p = popen_in_cgroup(intruder, [*helper("probe"), tries], f"/run/netns/{n2.netns}")
        out, err = p.communicate(timeout=60)
        got = [json.loads(line)["result"] for line in out.splitlines()]
        # from the node's namespace, so from the tunnel's address, but not the tunnel's
        assert got == ["timeout", "error ECONNREFUSED"], err
        d = _delta(ctl, before)
        assert d["guard_drop"] >= 1 and d["plain_no_tunnel"] == 1, d  # 15006 would decide
        # the tunnel's own cgroup (the node's system cgroup here): the same connections pass
        assert probe(lab, "n2", json.loads(tries)) == [
            "connected strict-pod",
            "connected permissive-pod",
        ]
    finally:
        ctl.unenrol(strict.cgroup)
        ctl.unenrol(permissive.cgroup)
        ctl.unsteer_plaintext(set())
        wait_for(lambda: not cgroup_procs(intruder), 5, what="the intruder to exit")
        os.rmdir(intruder)
