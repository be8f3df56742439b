"""The tunnel under load, with real clients: wrk with 1,000 connections, iperf3, a file's sha256,
10,000 open flows (and the tunnels' memory with them), 10,000 idle connections to 15008."""

import hashlib
import json
import os
import re
import subprocess
import sys
import time

import pytest

from agent.lab import apps, mesh
from agent.lab import lab as labmod
from bench.datapath import rss_kib
from tests.conftest import helper, mesh_lab, tunnel_stats, wait_for, wait_port


@pytest.fixture(scope="module")
def llab():
    # ten thousand open flows from one pod: above the default per-workload limit (4,096)
    yield from mesh_lab("ld", 2, 2, capture=True, max_connections=20_000)


def _tunnel_pid(L, node) -> int:
    return mesh.agent_status(L, node)["tunnel"]["pid"]


def _rss_mib(pid: int) -> float:
    return rss_kib(pid) / 1024


@pytest.mark.parametrize("dst", ["n2-p1", "n1-p2"], ids=["cross-node", "same-node"])
def test_wrk_with_1000_connections(llab, procs, tmp_path, dst):
    L, _ = llab
    procs.append(apps.start_nginx(L, dst, 8080, str(tmp_path / "nginx")))
    ip = L.pod(dst).ip
    wait_port(L, dst, ip, 8080)
    r = L.run(
        "n1-p1",
        ["wrk", "-t", "2", "-c", "1000", "-d", "6s", "--timeout", "10s", f"http://{ip}:8080/"],
        timeout=60,
    )
    print(r.stdout)
    done = int(re.search(r"(\d+) requests in", r.stdout).group(1))
    assert done > 1000
    assert "Socket errors" not in r.stdout, r.stdout  # no connect, read, write or timeout error
    assert "Non-2xx" not in r.stdout, r.stdout
    # every flow is released once wrk is done, on both nodes
    for node in ("n1", "n2"):
        wait_for(
            lambda n=node: tunnel_stats(L, n)["relayed_sides"] == 0,
            15,
            what=f"{node} flows released",
        )


def test_5000_cross_node_connections_of_one_request_each_succeed_and_are_released(
    llab, procs, tmp_path
):
    """Every connection opens an HBONE stream on n1 and a delivery on n2; after the last one,
    nothing of any of them is left on either node: no relayed side, no enforced flow, no fact
    kept for replay, no open stream, no live kernel flow."""
    L, _ = llab
    n = 5_000
    dst = L.pod("n2-p2")
    procs.append(apps.start_nginx(L, dst.name, 8081, str(tmp_path / "nginx")))
    wait_port(L, dst.name, dst.ip, 8081)
    before = {node: tunnel_stats(L, node) for node in ("n1", "n2")}
    r = L.run("n1-p2", [*helper("oneshot"), dst.ip, "8081", str(n), "32"], timeout=300)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{n} connections of one request each, cross-node: {got['conns_per_s']:.0f}/s")
    assert (got["ok"], got["failed"]) == (n, 0), got
    after = {node: tunnel_stats(L, node) for node in ("n1", "n2")}
    assert after["n1"]["hbone"] - before["n1"].get("hbone", 0) == n  # each one its own stream
    assert after["n2"]["inbound"] - before["n2"].get("inbound", 0) == n
    for node in ("n1", "n2"):
        wait_for(
            lambda node=node: (st := tunnel_stats(L, node))["relayed_sides"] == 0
            and st["enforced_flows"] == 0
            and st["facts_kept"] == 0  # kept for a new agent line only while their flow is open
            and not _connections(L, node)["open_streams"],
            15,
            what=f"every flow released on {node}",
        )
    flows = subprocess.run(
        [sys.executable, "-m", "agent.cli", "flows", "--node", f"{L.name}/n1", "--port", "8081",
         "--state", "live", "-o", "json"], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert json.loads(flows)["flows"] == []


def _connections(L, node) -> dict:
    r = L.run(node, ["curl", "-s", "--max-time", "5", "http://127.0.0.1:15000/connections"])
    return json.loads(r.stdout)


def test_iperf3_across_nodes_and_a_files_sha256_both_paths(llab, procs, tmp_path):
    L, _ = llab
    dst = L.pod("n2-p2")
    srv = L.popen(
        "n2-p2", ["iperf3", "-s", "-J", "-B", dst.ip, "-p", "5401"], stdout=subprocess.DEVNULL
    )
    procs.append(srv)
    wait_port(L, "n2-p2", dst.ip, 5401)
    r = L.run(
        "n1-p1", ["iperf3", "-c", dst.ip, "-p", "5401", "-t", "5", "-J"], timeout=60, check=False
    )
    res = json.loads(r.stdout)
    assert r.returncode == 0 and "error" not in res, r.stdout[-500:]
    sent = res["end"]["sum_sent"]["bytes"]
    print(f"iperf3 through HBONE: {res['end']['sum_received']['bits_per_second'] / 1e9:.2f} Gbit/s")
    assert sent > 10_000_000
    # The file's integrity is checked with curl, not iperf3 -F: iperf3 skips chunks of the
    # file when a send is partial and ends its test before in-flight bytes are written
    # (esnet/iperf#301, #798; "iperf3 is not a file transfer tool"). Seen here: direct on
    # loopback no send is partial, through any proxy that pushes back some are.
    payload = os.urandom(32 * 1024 * 1024)
    # a 32 MiB file through the mesh, across nodes (HBONE) and on the node (splice): curl's
    # copy from nginx has the file's sha256
    files = tmp_path / "files"
    files.mkdir()
    (files / "payload.bin").write_bytes(payload)
    want = hashlib.sha256(payload).hexdigest()
    for pod in ("n2-p2", "n1-p2"):
        ip = L.pod(pod).ip
        procs.append(apps.start_nginx(L, pod, 8090, str(tmp_path / pod), files=str(files)))
        wait_port(L, pod, ip, 8090)
        out = tmp_path / f"from-{pod}.bin"
        L.run("n1-p1", ["curl", "-fsS", "-o", str(out), f"http://{ip}:8090/files/payload.bin"])
        assert hashlib.sha256(out.read_bytes()).hexdigest() == want, pod


_HOLD_SERVER = r"""
import asyncio, resource, sys
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 10,000 sockets need more than 1024
async def main():
    async def h(r, w):
        await r.readexactly(1)
        w.write(b"y")
        await r.read()  # until the client closes
        w.close()
    s = await asyncio.start_server(h, sys.argv[1], int(sys.argv[2]), backlog=4096)
    print("listening", flush=True)
    await s.serve_forever()
asyncio.run(main())
"""

_HOLD_CLIENT = r"""
import resource, socket, sys
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 10,000 sockets need more than 1024
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks, ok = [], 0
for _ in range(n // 100):  # 100 at a time: a flow is open once its byte came back
    batch = [socket.create_connection((ip, port), timeout=30) for _ in range(100)]
    for s in batch:
        s.sendall(b"x")
    ok += sum(1 for s in batch if s.recv(1) == b"y")
    socks += batch
print(ok, flush=True)
sys.stdin.readline()  # hold them until told
for s in socks:
    s.close()
print("closed", flush=True)
"""


def test_ten_thousand_open_flows_and_the_tunnels_memory(llab, procs):
    L, _ = llab
    n = 10_000
    dst = L.pod("n2-p1")
    srv = L.popen(
        "n2-p1", ["python3", "-c", _HOLD_SERVER, dst.ip, "7000"], stdout=subprocess.PIPE, text=True
    )
    procs.append(srv)
    assert srv.stdout.readline().strip() == "listening"
    pids = {node: _tunnel_pid(L, node) for node in ("n1", "n2")}
    before = {node: _rss_mib(pid) for node, pid in pids.items()}
    flows0 = tunnel_stats(L, "n1").get("hbone", 0)
    t0 = time.monotonic()
    cli = L.popen(
        "n1-p1",
        ["python3", "-c", _HOLD_CLIENT, dst.ip, "7000", str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(cli)
    line = cli.stdout.readline().strip()
    if line != str(n):
        cli.kill()
        logs = {}
        for node in ("n1", "n2"):
            with open(os.path.join(labmod.STATE_DIR, L.name, node, "tunnel.log")) as f:
                logs[node] = [x for x in f.read().splitlines() if "state loaded" not in x][-6:]
        raise AssertionError(f"client: {line!r} {cli.stderr.read()[-500:]} logs: {logs}")
    # every flow carried a byte each way
    took = time.monotonic() - t0
    held = {node: _rss_mib(pid) for node, pid in pids.items()}
    s1, s2 = tunnel_stats(L, "n1"), tunnel_stats(L, "n2")
    print(
        f"\n{n} open flows across nodes set up in {took:.1f}s ({n / took:.0f}/s); tunnel RSS "
        f"n1 {before['n1']:.1f} -> {held['n1']:.1f} MiB, n2 {before['n2']:.1f} -> {held['n2']:.1f} MiB"
    )
    assert s1["hbone"] - flows0 == n and s2["relayed_sides"] >= n
    for node in pids:  # bounded: well under 10 KiB per open flow
        assert (held[node] - before[node]) * 1024 * 1024 / n < 10 * 1024, (node, before, held)
    cli.stdin.write("\n")
    cli.stdin.flush()
    assert cli.stdout.readline().strip() == "closed"
    wait_for(lambda: tunnel_stats(L, "n1")["relayed_sides"] < 10, 30, what="n1 flows released")
    wait_for(lambda: tunnel_stats(L, "n2")["relayed_sides"] < 10, 30, what="n2 flows released")


_IDLE = r"""
import resource, socket, sys, time
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 10,000 sockets need more than 1024
ip, n = sys.argv[1], int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect((ip, 15008))
    except BlockingIOError:
        pass
    socks.append(s)
print("open", flush=True)
sys.stdin.readline()
"""


def test_ten_thousand_idle_connections_to_the_hbone_port(llab, procs):
    L, _ = llab
    n = 10_000
    n2 = L.node("n2")
    pid = _tunnel_pid(L, "n2")
    before_rss = _rss_mib(pid)
    before = tunnel_stats(L, "n2").get("hbone_refused", {}).get("timeout", 0)
    idle = L.popen(
        "n1",
        ["python3", "-c", _IDLE, n2.ip, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    procs.append(idle)
    assert idle.stdout.readline().strip() == "open"
    peak = before_rss

    # the tunnel accepts them all, then cuts each after its handshake timeout (10 s)
    def all_cut():
        nonlocal peak
        peak = max(peak, _rss_mib(pid))
        return tunnel_stats(L, "n2").get("hbone_refused", {}).get("timeout", 0) - before >= n

    wait_for(all_cut, 60, what="every idle connection cut", interval=0.5)
    idle.kill()
    # still serving: ready, and a real flow across nodes works
    r = L.run("n2", ["curl", "-s", f"http://{n2.ip}:15021/healthz/ready"])
    assert r.stdout == "ready\n"
    print(f"\n{n} idle connections: tunnel RSS {before_rss:.1f} -> peak {peak:.1f} MiB")
    assert peak - before_rss < 200
    with open(os.path.join(labmod.STATE_DIR, L.name, "n2", "tunnel.log")) as f:
        log = f.read()
    assert "more HBONE handshakes refused in the last second" in log  # summarized, not 10,000 lines
    assert log.count("HBONE handshake refused") < 1000


_CLOSE_FIRST = r"""
import collections, errno, json, socket, sys
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ok, errors = 0, collections.Counter()
for _ in range(n):  # one byte each way, then this side closes first: its socket keeps TIME_WAIT
    try:
        s = socket.create_connection((ip, port), timeout=10)
        s.sendall(b"x")
        ok += s.recv(1) == b"y"
        s.close()
    except OSError as e:
        errors[errno.errorcode.get(e.errno, str(e))] += 1
print(json.dumps({"ok": ok, "errors": errors}), flush=True)
"""


def test_a_workload_that_closes_first_does_not_run_out_of_ports(llab, procs):
    """Before: every captured connect() went to the tunnel's one address and port, so a
    workload's closed connections (TIME_WAIT, 60 s, on the side that closes first) all had one
    destination and took its local ports: wrk's clients slowed from 2,300 to 500 connections/s
    within 20 s, and with 500 local ports the 501st connect() failed (EADDRNOTAVAIL). Now they
    go to a random one of the tunnel.spread ports (own.c hands them to the listener). Here the
    client has 500 local ports and makes 2,000 connections across nodes, closing each first."""
    L, _ = llab
    client, dst = L.pod("n1-p2"), L.pod("n2-p1")
    srv = L.popen(dst.name, ["python3", "-c", _HOLD_SERVER, dst.ip, "7100"],
                  stdout=subprocess.PIPE, text=True)  # fmt: skip
    procs.append(srv)
    assert srv.stdout.readline().strip() == "listening"
    key = "net.ipv4.ip_local_port_range"
    before = L.run(client.name, ["sysctl", "-n", key]).stdout.split()
    L.run(client.name, ["sysctl", "-w", f"{key}=40000 40499"])  # the pod's own namespace
    try:
        r = L.run(client.name, ["python3", "-c", _CLOSE_FIRST, dst.ip, "7100", "2000"],
                  timeout=300)  # fmt: skip
        got = json.loads(r.stdout)
        tw = L.run(client.name, ["ss", "-Htan", "state", "time-wait"]).stdout.splitlines()
    finally:
        L.run(client.name, ["sysctl", "-w", f"{key}={' '.join(before)}"])
    assert (got["ok"], got["errors"]) == (2000, {}), got
    assert len(tw) > 500  # more closed connections held than the client has ports
    n1 = L.node("n1")
    ports = {int(line.split()[-1].rsplit(":", 1)[1]) for line in tw}
    assert len(ports) > 100 and all(20000 <= p <= 21023 for p in ports), sorted(ports)[:10]
    assert {line.split()[-1].rsplit(":", 1)[0] for line in tw} == {n1.gateway}


def test_a_host_connection_to_a_spread_port_is_not_the_tunnels(llab, procs):
    """own.c takes a connection to a spread port only with a capture record for its 4-tuple:
    a host process's own connection to gateway:20500 reaches the host's listener there."""
    L, _ = llab
    n1 = L.node("n1")
    echo = (
        "import socket,sys; s=socket.create_server((sys.argv[1], 20500)); print('listening', "
        "flush=True); c,_=s.accept(); c.sendall(b'host:'+c.recv(5)); c.close()"
    )
    srv = L.popen("n1", ["python3", "-c", echo, n1.gateway], stdout=subprocess.PIPE, text=True)
    procs.append(srv)
    assert srv.stdout.readline().strip() == "listening"
    hello = (
        "import socket,sys; c=socket.create_connection((sys.argv[1], 20500), timeout=5); "
        "c.sendall(b'hello'); print(c.recv(64).decode())"
    )
    assert L.run("n1", ["python3", "-c", hello, n1.gateway]).stdout.strip() == "host:hello"
