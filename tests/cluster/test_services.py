"""The node as systemd runs it: agent and tunnel as separate services, on a real lab.

There is no systemd as PID 1 on this machine, so the test plays systemd's
part of the notify protocol itself: it binds the $NOTIFY_SOCKET, reads each
datagram with the sender's credentials (SO_PASSCRED), and checks that
READY=1, WATCHDOG=1 and STOPPING=1 come from the right processes at the
right moments. The Vagrant test (vagrant/, `make vagrant-test`) runs the same
units under a real systemd.

Then what `systemctl restart dabba-agent` must keep: connections that stay
open across the agent's restart (one over HBONE to another node, one direct
on the node) move bytes while the agent is down and after it is back, new
connections work while it is down, and after the restart `dabba flows` shows
both held flows with their identities and exact byte counts.
"""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from agent.bpf.loader import ALL_PROGRAMS
from agent.lab import apps, mesh
from tests.cluster.test_flows import dabba, flows, one, spiffe
from tests.conftest import helper, mesh_lab, wait_for, wait_port

WATCHDOG_USEC = 2_000_000  # WATCHDOG=1 every second


class Notify:
    """systemd's end of sd_notify: a datagram socket that learns each sender's pid."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, int, str]] = []  # (time, pid, line)
        self.closed = False
        # read at once, as systemd does (the socket's queue holds only 10 datagrams)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while not self.closed:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            pid = 0
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            for line in data.decode().splitlines():
                self.got.append((time.monotonic(), pid, line))

    def lines(self, pid: int, since: float = 0.0) -> list[str]:
        return [line for t, p, line in list(self.got) if p == pid and t >= since]

    def wait(self, pid: int, line: str, since: float = 0.0, timeout: float = 30.0) -> None:
        wait_for(lambda: line in self.lines(pid, since), timeout, what=f"{line} from pid {pid}")


@pytest.fixture(scope="module")
def notify(tmp_path_factory):
    n = Notify(str(tmp_path_factory.mktemp("sd") / "notify"))
    yield n
    n.closed = True
    n.sock.close()


@pytest.fixture(scope="module")
def slab(notify):
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    # addresses as `dabba install systemd` sets up a host: the tunnel on the node's own address
    yield from mesh_lab("sv", 2, 2, capture=True, tunnel_service=True, env=env, host_addresses=True)


HOLD = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
total = 0
for line in sys.stdin:
    n = int(line)
    s.sendall(b"x" * n)
    got = 0
    while got < n:
        b = s.recv(n - got)
        if not b:
            print("eof", total, flush=True)
            sys.exit(1)
        got += len(b)
    total += n
    print("ok", total, flush=True)
s.shutdown(socket.SHUT_WR)
assert s.recv(1) == b""
s.close()
print("closed", total, flush=True)
"""


class Held:
    """A connection held open from a pod; each round trip sends n bytes and reads them echoed."""

    def __init__(self, L, procs, src, ip, port):
        self.p = L.popen(
            src,
            [sys.executable, "-c", HOLD, ip, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(self.p)

    def round_trip(self, n: int) -> str:
        self.p.stdin.write(f"{n}\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def close(self) -> str:
        self.p.stdin.close()
        out = self.p.stdout.readline().strip()
        self.p.wait(10)
        return out


def echo_server(L, procs, pod, port):
    p = L.popen(
        pod.name,
        ["socat", f"TCP-LISTEN:{port},bind={pod.ip},fork,reuseaddr", "EXEC:cat"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs.append(p)
    wait_port(L, pod.name, pod.ip, port)


def test_agent_and_tunnel_tell_systemd_they_are_ready_and_alive(slab, notify):
    L, procs = slab
    for node in ("n1", "n2"):
        for key in (node, f"{node}-tunnel"):
            pid = procs[key].pid
            notify.wait(pid, "READY=1")
            status = [x for x in notify.lines(pid) if x.startswith("STATUS=")]
            assert status, f"{key} sent no STATUS= with READY=1"
            # WatchdogSec=2s: a ping every second while the process works
            t0 = time.monotonic()
            wait_for(
                lambda pid=pid, t0=t0: notify.lines(pid, t0).count("WATCHDOG=1") >= 2,
                5,
                what=f"two watchdog pings from {key}",
            )
    lines = notify.lines(procs["n1"].pid)
    assert lines[0] == "STATUS=loading the datapath (the first start compiles the eBPF programs)"
    agent_status = lines[lines.index("READY=1") + 1]  # sent with READY=1
    # every program, the BPF LSM one only where the kernel runs it (not on this machine's kind)
    pins = os.path.join("/sys/fs/bpf/dabba", L.node("n1").bpf_node, "progs")
    assert len(os.listdir(pins)) in (len(ALL_PROGRAMS), len(ALL_PROGRAMS) - 1)
    assert agent_status.startswith(f"STATUS=datapath pinned ({len(os.listdir(pins))} programs), ")
    assert "workloads enrolled" in agent_status
    lines = notify.lines(procs["n1-tunnel"].pid)
    tunnel_status = lines[lines.index("READY=1") + 1]
    assert f"HBONE {L.node('n1').ip}:15008" in tunnel_status


def test_agent_restart_drops_no_connection_and_flows_keep_their_identities(
    slab, notify, procs, tmp_path
):
    L, lab_procs = slab
    a, local, remote = L.pod("n1-p1"), L.pod("n1-p2"), L.pod("n2-p1")
    echo_server(L, procs, remote, 7100)
    echo_server(L, procs, local, 7101)
    hbone = Held(L, procs, a.name, remote.ip, 7100)
    splice = Held(L, procs, a.name, local.ip, 7101)
    assert hbone.round_trip(1000) == "ok 1000"
    assert splice.round_trip(1000) == "ok 1000"
    wait_for(lambda: len(flows(L, "n1", "--port", "7100", "--state", "live")) == 1, 10)
    # then many short flows across nodes: more than the tunnels kept for a new agent before
    # (the last 16,384 facts, whatever their flows: the held flow's went, and the restarted
    # agent showed it as "pending", without identities). Now every open flow's fact is kept
    web = L.pod("n2-p2")
    procs.append(apps.start_nginx(L, web.name, 8082, str(tmp_path / "nginx")))
    wait_port(L, web.name, web.ip, 8082)
    r = L.run(local.name, [*helper("oneshot"), web.ip, "8082", "17000", "32"], timeout=300)
    churn = json.loads(r.stdout.strip().splitlines()[-1])
    assert (churn["ok"], churn["failed"]) == (17000, 0), churn

    # stop both agents, as `systemctl stop dabba-agent` does (SIGTERM)
    stopped = time.monotonic()
    for node in ("n1", "n2"):
        p = lab_procs[node]
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0, f"agent {node} exited {p.returncode}"
        notify.wait(p.pid, "STOPPING=1", since=stopped, timeout=1)
    # the pinned programs and the tunnels carry on: old connections and new ones
    assert hbone.round_trip(2000) == "ok 3000"
    assert splice.round_trip(2000) == "ok 3000"
    fresh = Held(L, procs, a.name, remote.ip, 7100)
    assert fresh.round_trip(500) == "ok 500"
    assert fresh.close() == "closed 500"
    assert lab_procs["n1-tunnel"].poll() is None and lab_procs["n2-tunnel"].poll() is None

    # start them again (systemctl start): they adopt the pins and the tunnels' flows
    started = time.monotonic()
    for node in ("n1", "n2"):
        cfg = os.path.join(mesh.paths(L)["root"], f"{node}.yaml")
        env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        p = mesh.start_agent(L, node, cfg, env)
        lab_procs[node] = p
        notify.wait(p.pid, "READY=1", since=started, timeout=60)
        wait_for(lambda node=node: mesh.ready(L, node), 60, what=f"agent {node} back")
    assert hbone.round_trip(3000) == "ok 6000"
    assert splice.round_trip(3000) == "ok 6000"
    assert hbone.close() == "closed 6000"
    assert splice.close() == "closed 6000"

    # the restarted agent shows both held flows, whole, with the identities the tunnel replayed
    wait_for(lambda: flows(L, "n1", "--port", "7100", "--state", "closed"), 10, what="n1 7100")
    held = [f for f in flows(L, "n1", "--port", "7100", "--state", "closed") if f["bytes_to_dst"]]
    src = one(held, bytes_to_dst=6000)
    assert (src["path"], src["security"], src["bytes_to_src"]) == ("hbone", "mutual_tls", 6000)
    assert (src["src"]["identity"], src["dst"]["identity"]) == (spiffe(a), spiffe(remote))
    wait_for(lambda: flows(L, "n2", "--port", "7100", "--state", "closed"), 10, what="n2 7100")
    dst = one(flows(L, "n2", "--port", "7100", "--state", "closed"), bytes_to_dst=6000)
    assert (dst["path"], dst["src"]["identity"], dst["bytes_to_src"]) == (
        "hbone",
        spiffe(a),
        6000,
    )
    wait_for(lambda: len(flows(L, "n1", "--port", "7101", "--state", "closed")) == 2, 10)
    for f in flows(L, "n1", "--port", "7101", "--state", "closed"):
        # straight through the kernel, and the restarted agent still names the verdict
        assert (f["path"], f["bytes_to_dst"], f["bytes_to_src"]) == ("direct", 6000, 6000)
        assert f["reason"] == "allowed: no ALLOW policy applies to the workload", f
    st = dabba("status", "--node", f"{L.name}/n1")
    assert "tunnel" in st.stdout


def test_tunnel_run_from_the_agent_config_names_what_is_missing(tmp_path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("node: x\ncgroup: /sys/fs/cgroup/unified/x\ntunnel: {address: 10.1.1.1}\n")
    r = dabba("tunnel", "run", "--config", str(cfg), check=False)
    assert r.returncode == 1
    assert "needs tunnel.inbound or control.node_address" in r.stderr
    r = dabba("tunnel", "run", "--node", "x", check=False)
    assert r.returncode == 1
    assert "needs --state-dir, --maps, --outbound, --inbound (or --config FILE)" in r.stderr
