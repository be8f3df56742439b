"""Native IPv6 through the mesh, end to end, in a dual-stack lab (every pod and node has an IPv6
address, the tunnels an IPv6 outbound listener and source).

Before, native IPv6 of enrolled workloads was refused in the kernel (fail closed, never around
the mesh), so a dual-stack workload could not use its IPv6 address at all. Now it is carried
exactly like IPv4: captured, given the workloads' identities, encrypted between nodes, held to
policy (IPv6 ipBlocks included), guarded for STRICT workloads and steered to the tunnel's 15006
for PERMISSIVE ones; and what cannot be carried is still refused."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import (
    cgroup_procs,
    helper,
    http_server,
    mesh_lab,
    popen_in_cgroup,
    read_json,
    spiffe,
    tunnel_stats,
    wait_for,
    write_registry,
)

MARKER = "ipv6-plaintext-marker-51c9"
TD = "cluster.local"


@pytest.fixture(scope="module")
def slab():
    yield from mesh_lab("six", 2, 2, capture=True)


def _flows(L, node: str, port: int) -> list[dict]:
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "flows", "--node", f"{L.name}/{node}", "--port",
         str(port), "-o", "json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["flows"]


def _xfer(L, procs, src: str, dst: str, port: int, send=100_000, answer=3_333):
    """src sends `send` bytes to [dst's IPv6]:port, dst answers `answer`: (client, server)
    reports, or (None, the client's error) when the connection failed."""
    d = L.pod(dst)
    srv = L.popen(dst, [*helper("xfer"), "server", "--listen", f"[{d.ip6}]:{port}",
                        "--send", str(answer)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  text=True)  # fmt: skip
    procs.append(srv)
    read_json(srv, "listening")
    r = L.run(src, [*helper("xfer"), "client", "--connect", f"[{d.ip6}]:{port}",
                    "--send", str(send)], check=False, timeout=60)  # fmt: skip
    if r.returncode != 0:
        srv.kill()
        return None, r.stderr.strip().splitlines()[-1:]
    return json.loads(r.stdout.strip().splitlines()[-1]), read_json(srv, "received")


def test_ipv6_across_nodes_is_mutual_tls_with_identities_and_exact_bytes(slab, procs, tmp_path):
    L, _ = slab
    client, server = L.pod("n1-p1"), L.pod("n2-p1")
    pcap = tmp_path / "br0.pcap"
    cap = L.popen(
        "lab", ["tcpdump", "-i", "br0", "-U", "-w", str(pcap), "tcp or ip6"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    procs.append(cap)
    time.sleep(1)
    web = L.pod("n2-p2")
    procs.append(L.popen(web.name, ["python3", "-m", "http.server", "8080", "--bind", "::"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
    wait_for(lambda: L.run(web.name, ["ss", "-Hltn", "sport = :8080"]).stdout.strip(), 10)
    r = L.run("n1-p1", ["curl", "-sS", "--max-time", "5", "-H", f"X-Marker: {MARKER}",
                        f"http://[{web.ip6}]:8080/"], check=False)  # fmt: skip
    assert r.returncode == 0 and "Directory listing" in r.stdout, r.stderr
    got, srv = _xfer(L, procs, "n1-p1", "n2-p1", 9600)
    assert got is not None, srv
    time.sleep(1)
    cap.terminate()
    cap.wait(5)
    assert (got["sent"], got["received"], srv["received"], srv["sent"]) == (
        100_000, 3_333, 100_000, 3_333)  # fmt: skip
    # the client's connect() went to its node tunnel's IPv6 listener (captured, as IPv4 is),
    # and getpeername() gives what it asked for, the server, as without a mesh (peer.c); the
    # server was reached over IPv6 from its own node's tunnel (the tunnel's IPv6 source),
    # never from the client across the bridge
    assert got["peer"][0] == server.ip6
    assert srv["peer"][0] == L.node("n2").gateway6
    data = pcap.read_bytes()
    assert len(data) > 2000 and MARKER.encode() not in data
    assert b"\x00\x2b\x00\x02\x03\x04" in data  # TLS 1.3 ServerHello: HBONE between the nodes

    def flow():
        fs = [f for f in _flows(L, "n1", 9600) if f["state"] != "open"]
        return fs[0] if len(fs) == 1 else None

    f = wait_for(flow, 10, what="the client's flow on n1")
    assert (f["src"]["ip"], f["dst"]["ip"], f["dst"]["port"]) == (client.ip6, server.ip6, 9600)
    assert (f["src"]["identity"], f["dst"]["identity"]) == (spiffe(client), spiffe(server))
    assert (f["path"], f["security"]) == ("hbone", "mutual_tls"), f
    assert (f["bytes_to_dst"], f["bytes_to_src"]) == (100_000, 3_333), f
    g = wait_for(lambda: (fs := _flows(L, "n2", 9600)) and fs[0], 10, what="the flow on n2")
    assert (g["src"]["identity"], g["dst"]["ip"], g["path"]) == (
        spiffe(client), server.ip6, "hbone")  # fmt: skip
    assert (g["bytes_to_dst"], g["bytes_to_src"]) == (100_000, 3_333), g


def test_ipv6_on_the_same_node_goes_direct_with_exact_bytes(slab, procs):
    """Same node, native IPv6: the kernel's verdict lets it go straight to the destination."""
    L, _ = slab
    before = tunnel_stats(L, "n1").get("splice", 0)
    got, srv = _xfer(L, procs, "n1-p1", "n1-p2", 9601, send=2_000_000, answer=77)
    assert got is not None, srv
    assert (got["sent"], got["received"], srv["received"], srv["sent"]) == (
        2_000_000, 77, 2_000_000, 77)  # fmt: skip
    assert srv["peer"][0] == L.pod("n1-p1").ip6  # the client itself: no tunnel on the way
    assert tunnel_stats(L, "n1").get("splice", 0) == before
    f = wait_for(
        lambda: [f for f in _flows(L, "n1", 9601) if f["reporter"] == "source"],
        10, what="the flow",
    )[0]  # fmt: skip
    assert (f["dst"]["ip"], f["path"], f["security"]) == (L.pod("n1-p2").ip6, "direct",
                                                          "node_local"), f  # fmt: skip
    assert (f["bytes_to_dst"], f["bytes_to_src"]) == (2_000_000, 77), f


def _dump(L, node: str) -> dict:
    r = L.run(node, ["curl", "-s", "--max-time", "2", "http://127.0.0.1:15000/config_dump"])
    return json.loads(r.stdout)


def _curl(source: str | None, host: str, port: int) -> list[str]:
    extra = ["--interface", source] if source else []
    return ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--connect-timeout", "2",
            "--max-time", "3", *extra, f"http://{host}:{port}/"]  # fmt: skip


def _connects(L, src: str, host: str, port: int) -> bool:
    r = L.run(src, _curl(None, host, port), check=False)
    return r.returncode == 0 and r.stdout == "200"


def _host_connects(L, node: str, host: str, port: int, source: str | None = None) -> bool:
    """A host process on node (its network namespace, a cgroup of its own: not the tunnel's)."""
    n = L.node(node)
    cg = os.path.join(n.cgroup, "_host6")
    os.makedirs(cg, exist_ok=True)
    try:
        p = popen_in_cgroup(cg, _curl(source, host, port), f"/run/netns/{n.netns}")
        out, _ = p.communicate(timeout=30)
        return p.returncode == 0 and out == "200"
    finally:
        wait_for(lambda: not cgroup_procs(cg), 5, what="the host process to exit")
        os.rmdir(cg)


def test_an_ipv6_ip_block_admits_ipv6_and_only_ipv6(slab, procs):
    """ipBlocks of IPv6 CIDRs: an IPv6 source is held to them like an IPv4 one (across nodes
    the destination's tunnel sees the client workload's own IPv6 address, vouched for by its
    node in the Forwarded header)."""
    L, _ = slab
    dst = L.pod("n2-p1")
    http_server(L, procs, dst, 8081)  # IPv4
    procs.append(L.popen(dst.name, ["python3", "-m", "http.server", "8082", "--bind", dst.ip6],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
    wait_for(lambda: L.run(dst.name, ["ss", "-Hltn", "sport = :8082"]).stdout.strip(), 10)
    policy = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "n2-p1-v6-only", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "n2-p1"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"ipBlocks": [L.node("n1").pod_cidr6]}}]}],
        },
    }
    try:
        write_registry(L, "v6-block", [policy])
        wait_for(lambda: {p["name"] for p in _dump(L, "n2")["policies"]} == {"default/n2-p1-v6-only"},
                 15, what="the policy on n2")  # fmt: skip
        assert _connects(L, "n1-p1", f"[{dst.ip6}]", 8082)
        assert not _connects(L, "n1-p1", dst.ip, 8081)  # 10.20.1.11: not in the block
        assert not _connects(L, "n2-p2", f"[{dst.ip6}]", 8082)  # fd00:20:2::c: not in it
    finally:
        write_registry(L, "v6-block", [])
        wait_for(lambda: not _dump(L, "n2")["policies"], 15, what="no policy on n2")
    assert _connects(L, "n1-p1", dst.ip, 8081)


def _peer_auth(app: str, mode: str) -> dict:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": f"{app}-mtls", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": app}}, "mtls": {"mode": mode}},
    }


def _guard_drops(L, node: str) -> int:
    from agent.bpf.control import DatapathControl
    from agent.bpf.loader import Datapath

    n = L.node(node)
    return DatapathControl(Datapath(n.bpf_node, n.cgroup)).stats()["guard_drop"]


def test_ipv6_plaintext_from_the_node_is_steered_when_permissive_and_dropped_when_strict(
    slab, procs
):
    """A host process on the node (the node's own IPv6 addresses, the tunnel's included, as a
    host-network pod has them) is a plaintext peer: steered to the tunnel's 15006 and held to
    the policy of a PERMISSIVE workload, dropped in the kernel for a STRICT one, whichever
    source address it picks."""
    L, _ = slab
    dst, n2 = L.pod("n2-p2"), L.node("n2")
    procs.append(L.popen(dst.name, ["python3", "-m", "http.server", "8083", "--bind", "::"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
    wait_for(lambda: L.run(dst.name, ["ss", "-Hltn", "sport = :8083"]).stdout.strip(), 10)
    host = f"[{dst.ip6}]"
    before = tunnel_stats(L, "n2").get("plain_inbound", 0)
    assert _host_connects(L, "n2", host, 8083)
    assert _host_connects(L, "n2", host, 8083, source=n2.gateway6)  # the tunnel's own address
    assert tunnel_stats(L, "n2").get("plain_inbound", 0) == before + 2  # both through 15006
    try:
        write_registry(L, "v6-strict", [_peer_auth("n2-p2", "STRICT")])
        wait_for(lambda: {w["name"]: w["mtls_mode"] for w in _dump(L, "n2")["local_workloads"]}
                 .get("n2-p2") == "STRICT", 15, what="n2-p2 STRICT")  # fmt: skip
        time.sleep(1.5)  # the agent re-enrols it with the guard's flag on its next snapshot
        drops = _guard_drops(L, "n2")
        assert not _host_connects(L, "n2", host, 8083)
        assert not _host_connects(L, "n2", host, 8083, source=n2.gateway6)
        assert not _host_connects(L, "n2", host, 8083, source=n2.ip6)
        assert _guard_drops(L, "n2") >= drops + 3
        assert _connects(L, "n1-p1", host, 8083)  # mutual TLS through the tunnels: fine
        assert _connects(L, "n2-p1", host, 8083)  # and from its own node's pods
    finally:
        write_registry(L, "v6-strict", [])


def test_ipv6_the_mesh_cannot_carry_is_still_refused(slab, procs):
    """Link-local, the node's own IPv6 addresses and the mesh's ports stay refused in the
    kernel (EPERM) with IPv6 carried, and an address outside the mesh is passthrough, not
    sent around the tunnel."""
    L, _ = slab
    n1 = L.node("n1")
    tries = [
        {"op": "tcp", "host": n1.gateway6, "port": 8080, "family": 6},
        {"op": "tcp", "host": n1.ip6, "port": 22, "family": 6},
        {"op": "tcp", "host": L.pod("n2-p1").ip6, "port": 15008, "family": 6},
        {"op": "tcp", "host": "fe80::1%eth0", "port": 80, "family": 6},
    ]
    r = L.run("n1-p1", [*helper("probe"), json.dumps(tries)])
    got = [json.loads(line)["result"] for line in r.stdout.splitlines()]
    assert got == ["error EPERM"] * len(tries), got
    refused = [f for f in _flows(L, "n1", 8080) + _flows(L, "n1", 22) if f["verdict"] == "deny"]
    assert {(f["dst"]["ip"], f["reason"]) for f in refused} >= {
        (n1.gateway6, "refused in the kernel: the destination is an address of the node itself"),
        (n1.ip6, "refused in the kernel: the destination is an address of the node itself"),
    }
