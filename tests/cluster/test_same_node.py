"""Same-node traffic decided in the kernel (issue "same-node kernel path"): a connection between
two workloads of one node goes straight through the kernel's TCP when the node's compiled
policy verdicts allow it, fails at connect() when they deny it, and a policy change ends the
established ones it denies. The tunnel takes no part: these tests stop it."""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from agent.lab import mesh
from tests.conftest import (
    cgroup_procs,
    helper,
    mesh_lab,
    popen_in_cgroup,
    read_json,
    spiffe,
    tunnel_stats,
    wait_for,
    write_registry,
)

TD = "cluster.local"


@pytest.fixture(scope="module")
def dlab():
    yield from mesh_lab("sn", 2, 2, capture=True)


def _dabba(*args) -> dict:
    r = subprocess.run([sys.executable, "-m", "agent.cli", *args, "-o", "json"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _flows(L, port: int, **filters) -> list[dict]:
    extra = [x for k, v in filters.items() for x in (f"--{k}", v)]
    return _dabba("flows", "--node", f"{L.name}/n1", "--port", str(port), *extra)["flows"]


def _stats(L) -> dict:
    from agent.bpf.control import DatapathControl
    from agent.bpf.loader import Datapath

    n = L.node("n1")
    return DatapathControl(Datapath(n.bpf_node, n.cgroup)).stats()


def _server(L, procs, pod, port, *args):
    p = L.pod(pod)
    srv = L.popen(pod, [*helper("xfer"), "server", "--listen", f"{p.ip}:{port}", *args],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    procs.append(srv)
    read_json(srv, "listening")
    return srv


def _mode(L, pod: str) -> str:
    r = L.run("n1", ["curl", "-s", "--max-time", "2", "http://127.0.0.1:15000/config_dump"])
    return {w["name"]: w["mtls_mode"] for w in json.loads(r.stdout)["local_workloads"]}.get(pod)


def _generation(L) -> int:
    return mesh.agent_status(L, "n1")["same_node"]["generation"]


def _apply(L, name: str, docs: list[dict]) -> None:
    """Write a registry file and wait until n1's kernel holds a new generation of verdicts."""
    before = _generation(L)
    write_registry(L, name, docs)
    wait_for(lambda: _generation(L) != before, 15, what="new same-node verdicts on n1")


def _deny(name: str, src, port: int) -> dict:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "n1-p2"}},
            "action": "DENY",
            "rules": [{"from": [{"source": {"principals": [spiffe(src).removeprefix("spiffe://")]}}],
                       "to": [{"operation": {"ports": [str(port)]}}]}],
        },
    }  # fmt: skip


def test_same_node_goes_direct_with_exact_bytes_while_the_tunnel_is_stopped(dlab, procs):
    """Before: every same-node connection cost the tunnel an accept, a lookup, a decision, an
    upstream connect and a splice, in Python. Now the kernel connects the two workloads
    itself: with the node's tunnel stopped (SIGSTOP), same-node transfers still complete with
    every byte, and the flow shows both identities and the policy verdict that allowed it."""
    L, _ = dlab
    client, server = L.pod("n1-p1"), L.pod("n1-p2")
    pid = mesh.agent_status(L, "n1")["tunnel"]["pid"]
    before = _stats(L)
    os.kill(pid, signal.SIGSTOP)
    try:
        for port, addr in ((9700, server.ip), (9701, f"[{server.ip6}]")):
            srv = L.popen(server.name, [*helper("xfer"), "server", "--listen",
                                        f"{addr}:{port}", "--send", "3333"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
            procs.append(srv)
            read_json(srv, "listening")
            r = L.run(client.name, [*helper("xfer"), "client", "--connect", f"{addr}:{port}",
                                    "--send", "5000000"], timeout=60)  # fmt: skip
            got, s = json.loads(r.stdout.strip().splitlines()[-1]), read_json(srv, "received")
            assert (got["sent"], got["received"], s["received"], s["sent"]) == (
                5_000_000, 3333, 5_000_000, 3333)  # fmt: skip
            assert s["peer"][0] in (client.ip, client.ip6)  # the client itself, not a tunnel
        # across nodes there is a tunnel on the way: stopped, nothing gets through
        r = L.run(client.name, ["curl", "-s", "--max-time", "2", f"http://{L.pod('n2-p1').ip}:80/"],
                  check=False)  # fmt: skip
        assert r.returncode == 28  # timed out: the capture listener's owner is stopped
    finally:
        os.kill(pid, signal.SIGCONT)
    after = _stats(L)
    assert after["direct"] - before["direct"] == 2 and after["captured"] - before["captured"] == 1
    for port, ip in ((9700, server.ip), (9701, server.ip6)):
        fs = wait_for(lambda p=port: len(f := _flows(L, p)) == 2 and f, 10, what="both ends")
        for f in fs:
            assert (f["path"], f["security"], f["verdict"]) == ("direct", "node_local", "allow")
            assert (f["src"]["identity"], f["dst"]["identity"]) == (spiffe(client),
                                                                    spiffe(server))  # fmt: skip
            assert f["dst"]["ip"] == ip and f["reason"].startswith("allowed")
            assert (f["bytes_to_dst"], f["bytes_to_src"]) == (5_000_000, 3333), f
        assert {f["reporter"] for f in fs} == {"source", "destination"}


def test_a_denying_policy_refuses_in_the_kernel_naming_its_rule(dlab, procs):
    L, _ = dlab
    client, server = L.pod("n1-p1"), L.pod("n1-p2")
    for port in (9702, 9703):
        _server(L, procs, server.name, port, "--send", "1")
    before = _stats(L)
    try:
        _apply(L, "deny-9702", [_deny("deny-9702", client, 9702)])
        t0 = time.monotonic()
        tries = [
            {"op": "tcp", "host": h, "port": 9702, "family": f}
            for h, f in ((server.ip, 4), (server.ip6, 6), (f"::ffff:{server.ip}", 6))
        ]
        r = L.run(client.name, [*helper("probe"), json.dumps(tries)])
        got = [json.loads(line)["result"] for line in r.stdout.splitlines()]
        assert got == ["error EPERM"] * 3, got  # connect() itself fails, in every spelling
        assert time.monotonic() - t0 < 2
        r = L.run(client.name, [*helper("xfer"), "client", "--connect", f"{server.ip}:9703",
                                "--send", "10"], timeout=30)  # fmt: skip
        assert json.loads(r.stdout.strip().splitlines()[-1])["received"] == 1  # other port: fine
    finally:
        _apply(L, "deny-9702", [])
    assert _stats(L)["policy_refused"] - before["policy_refused"] == 3
    denied = wait_for(lambda: len(d := _flows(L, 9702, verdict="deny")) == 3 and d, 10,
                      what="the denied flows")  # fmt: skip
    f = denied[0]
    assert (f["path"], f["src"]["workload"], f["dst"]["workload"], f["policy"]) == (
        "denied", "default/n1-p1", "default/n1-p2", "default/deny-9702")  # fmt: skip
    assert f["reason"] == "refused in the kernel: denied by DENY policy default/deny-9702 rule 0"
    metrics = L.run("n1", ["curl", "-s", f"http://{L.node('n1').ip}:15020/metrics"]).stdout
    assert 'dabba_drops_total{reason="policy"}' in metrics


HOLD = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"hello")
print("open", flush=True)
s.settimeout(20)
try:
    print("closed", repr(s.recv(10)), flush=True)
except (ConnectionResetError, ConnectionAbortedError) as e:
    print("reset", type(e).__name__, flush=True)
except TimeoutError:
    print("still open", flush=True)
"""


def test_a_policy_change_ends_the_established_direct_flows_it_denies(dlab, procs):
    """No proxy holds a direct flow to close: the agent ends it in the kernel (SOCK_DESTROY),
    and both ends see a reset; a flow the new policy still allows stays open."""
    L, _ = dlab
    client, server = L.pod("n1-p1"), L.pod("n1-p2")
    srvs = [_server(L, procs, server.name, port, "--reset-after", "30") for port in (9704, 9705)]
    holds = [L.popen(client.name, [sys.executable, "-c", HOLD, server.ip, str(port)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for port in (9704, 9705)]  # fmt: skip
    procs.extend(holds)
    for h in holds:
        assert h.stdout.readline().strip() == "open"
    try:
        t0 = time.monotonic()
        _apply(L, "deny-9704", [_deny("deny-9704", client, 9704)])
        out = holds[0].stdout.readline().strip()
        took = time.monotonic() - t0
        assert out.startswith("reset"), out
        print(f"\ndirect flow ended {took:.2f}s after the policy was written")
        assert holds[1].poll() is None  # 9705 is still allowed: still open
    finally:
        _apply(L, "deny-9704", [])
    assert mesh.agent_status(L, "n1")["same_node"]["direct_flows_reset"] >= 1
    f = wait_for(lambda: [f for f in _flows(L, 9704) if f["reporter"] == "destination"
                          and f["state"] != "open"], 10, what="the server's end")[0]  # fmt: skip
    assert f["close"] == "reset", f  # the server saw the reset too
    holds[1].kill()
    for s in srvs:
        s.kill()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _syn(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A whole IPv4 packet: a TCP SYN from src (forged) to dst."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 12345, 0, 5 << 4, 0x02, 65535, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))  # fmt: skip
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + tcp


FORGE = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL: our header
for i in range(int(sys.argv[2])):
    s.sendto(bytes.fromhex(sys.argv[3 + i]), (sys.argv[1], 0))
print("sent", flush=True)
"""


def test_strict_takes_direct_connections_and_drops_forged_syns(dlab, procs):
    """A STRICT workload admits a direct connection by the proof its client's socket left in the
    kernel (its 4-tuple, written at connect); a SYN that merely carries a workload's address,
    crafted on a raw socket by a process of the node, has no such proof: dropped and counted."""
    L, _ = dlab
    client, server, n1 = L.pod("n1-p1"), L.pod("n1-p2"), L.node("n1")
    pa = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "n1-p2-strict", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "n1-p2"}}, "mtls": {"mode": "STRICT"}},
    }
    _server(L, procs, server.name, 9706, "--send", "7")
    _server(L, procs, server.name, 9707)  # listening for the forged SYNs
    try:
        write_registry(L, "strict", [pa])
        wait_for(lambda: _mode(L, "n1-p2") == "STRICT", 15, what="n1-p2 STRICT")
        time.sleep(1.5)  # the agent re-enrols n1-p2 with the guard's flag on this snapshot
        before = _stats(L)
        r = L.run(client.name, [*helper("xfer"), "client", "--connect", f"{server.ip}:9706",
                                "--send", "100"], timeout=30)  # fmt: skip
        assert json.loads(r.stdout.strip().splitlines()[-1])["received"] == 7
        mid = _stats(L)
        assert mid["guard_direct"] - before["guard_direct"] >= 1
        syns = [_syn(client.ip, server.ip, 40000 + i, 9707).hex() for i in range(3)]
        cg = os.path.join(n1.cgroup, "_forger")
        os.makedirs(cg, exist_ok=True)
        try:
            p = popen_in_cgroup(cg, [sys.executable, "-c", FORGE, server.ip, "3", *syns],
                                f"/run/netns/{n1.netns}")  # fmt: skip
            out, err = p.communicate(timeout=30)
            assert out.strip() == "sent", err
        finally:
            wait_for(lambda: not cgroup_procs(cg), 5, what="the forger to exit")
            os.rmdir(cg)
        after = wait_for(lambda: (s := _stats(L))["guard_drop"] - mid["guard_drop"] >= 3 and s,
                         5, what="three guard drops")  # fmt: skip
        assert after["guard_direct"] == mid["guard_direct"]  # none of them passed as direct
    finally:
        write_registry(L, "strict", [])
        wait_for(lambda: _mode(L, "n1-p2") != "STRICT", 15, what="n1-p2 back to PERMISSIVE")
    assert tunnel_stats(L, "n1").get("splice", 0) == 0  # no same-node flow went through it


CONNECT = r"""
import errno, socket, sys
s = socket.socket()
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected", flush=True)
except TimeoutError:
    print("timeout", flush=True)
except OSError as e:
    print("error", errno.errorcode.get(e.errno, e.errno), flush=True)
"""


def test_a_syn_sent_again_after_a_policy_change_is_judged_again(dlab, procs):
    """Before: a direct connection was judged at connect() only. Its first SYN lost, the
    verdict changed to deny, and its retransmitted SYN went through (the agent, stopped here,
    would have ended it; while it runs it does, but only if it sees the flow in time). Now the
    steering and the guard judge the SYN again against the verdicts in force."""
    from agent.bpf import abi, names
    from agent.bpf.control import DatapathControl, cgroup_id
    from agent.bpf.loader import Datapath

    L, agents = dlab
    client, server, n1 = L.pod("n1-p1"), L.pod("n1-p2"), L.node("n1")
    _server(L, procs, server.name, 9708, "--send", "1")
    ctl = DatapathControl(Datapath(n1.bpf_node, n1.cgroup))
    with ctl.dp.open_map(names.MAP_VERDICT) as m:
        gen = ctl.config().verdict_gen
        keep = {}
        for k, v in m.items():
            key, val = abi.from_bytes(abi.VerdictKey, k), abi.from_bytes(abi.Verdict, v)
            if key.gen == gen:
                keep[(key.cgroup_id, abi.ip6_str(key.dst), key.port)] = (val.rule, bool(val.allow))
    drop = ["INPUT", "-p", "tcp", "--dport", "9708", "--syn", "-j", "DROP"]
    L.run(server.name, ["iptables", "-I", *drop])  # the first SYN is lost
    agents["n1"].send_signal(signal.SIGSTOP)  # the agent we started: no recheck of its own
    before = _stats(L)
    try:
        cli = L.popen(client.name, [sys.executable, "-c", CONNECT, server.ip, "9708", "6"],
                      stdout=subprocess.PIPE, text=True)  # fmt: skip
        procs.append(cli)
        wait_for(lambda: _stats(L)["direct"] > before["direct"], 5, what="the direct connect()")
        deny = {**keep, (cgroup_id(client.cgroup), server.ip, 9708): (1, False)}
        ctl.set_verdicts(deny)  # the policy changes while the SYN is in flight
        L.run(server.name, ["iptables", "-D", *drop])  # the retransmitted SYNs get there
        out = cli.communicate(timeout=20)[0].strip()
    finally:
        L.run(server.name, ["iptables", "-D", *drop], check=False)
        ctl.set_verdicts(keep)
        agents["n1"].send_signal(signal.SIGCONT)
    # the retransmitted SYN is refused (the steering's drop: TCP answers a reset), not taken
    assert out == "error ECONNREFUSED", out
    assert _stats(L)["policy_refused"] > before["policy_refused"]
