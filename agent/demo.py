"""`dabba demo`: the main job on the embedded default, end to end on this machine.

Builds a 2-node lab, starts a control plane and one agent per node (which
loads the eBPF datapath, joins, gets a certificate per pod and runs the
node's tunnel), moves traffic between pods with real clients (curl and
python) through the mesh, and prints the flow table the kernel accounted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import click

from .errors import DabbaError
from .lab import lab as labmod
from .lab import spec


def run_demo(name: str, keep: bool) -> None:
    step = lambda s: click.secho(f"\n==> {s}", bold=True)  # noqa: E731
    if labmod.ls() and name in [x.name for x in labmod.ls()]:
        raise DabbaError(
            f"a lab named {name!r} already exists", hint=f"`dabba lab down {name}` or --name"
        )
    step("building a lab: 2 nodes, 2 pods each (network namespaces, veths, cgroups)")
    L = labmod.up(name, spec.default_spec(2, 2))
    agents = []
    try:
        for p in L.pods:
            click.echo(
                f"  {p.name:<8} {p.ip:<12} on {p.node}   spiffe://cluster.local/ns/{p.namespace}/sa/"
                f"{p.service_account}"
            )
        step("control plane, then one agent per node: eBPF datapath, join, certificates, tunnel")
        from .lab import mesh

        t0 = time.monotonic()
        procs = mesh.up(L, capture=True)
        agents = [
            (n, os.path.join(labmod.STATE_DIR, L.name, n.name), procs[n.name]) for n in L.nodes
        ]
        click.echo(
            f"  ready in {time.monotonic() - t0:.1f}s: control plane on {labmod.CONTROL_IP}:15012, "
            "agents joined with one-time tokens, a certificate per pod, tunnels listening"
        )
        for n, state, _ in agents:
            st = _status(state, None)
            click.echo(f"  {n.name}: {', '.join(st['control']['certs'])}")
        click.echo(f"  see them: dabba bpf status --node {L.nodes[0].bpf_node}")

        step("traffic with real clients")
        web = L.pod("n2-p1")
        srv = L.popen(
            web.name,
            ["python3", "-m", "http.server", "8080", "--bind", web.ip],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        local = L.pod("n1-p2")
        srv_local = L.popen(
            local.name,
            ["python3", "-m", "http.server", "8080", "--bind", local.ip],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        sink = L.pod("n2-p2")
        receiver = L.popen(
            sink.name,
            ["python3", "-c", _SINK, sink.ip, "9000", "123456"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            time.sleep(0.5)
            for _ in range(3):
                r = L.run(
                    "n1-p1",
                    [
                        "curl",
                        "-s",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{size_download}",
                        f"http://{web.ip}:8080/",
                    ],
                )
                click.echo(f"  n1-p1 -> {web.name}:8080  curl GET /  {r.stdout} bytes of body")
            r = L.run(
                "n1-p1",
                [
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{size_download}",
                    f"http://{local.ip}:8080/",
                ],
            )
            click.echo(
                f"  n1-p1 -> {local.name}:8080  curl GET /  {r.stdout} bytes of body (same node)"
            )
            r = L.run("n1-p2", ["python3", "-c", _SOURCE, sink.ip, "9000", "10000000"])
            back, received = r.stdout.strip(), receiver.communicate(timeout=30)[0].strip()
            click.echo(
                f"  n1-p2 -> {sink.name}:9000  sent 10,000,000 bytes, got back {back}; "
                f"{sink.name} received {received}"
            )
            if (back, received) != ("123,456", "10,000,000"):
                raise DabbaError(
                    f"the mesh lost bytes: expected 123,456 back and 10,000,000 received, "
                    f"got {back} and {received}",
                    hint=f"run `dabba demo --keep` and read {labmod.STATE_DIR}/{name}/*/tunnel.log",
                )
        finally:
            for p in (srv, srv_local):
                p.send_signal(signal.SIGTERM)
            receiver.kill()
            for p in (srv, srv_local):
                p.wait(5)

        step(
            "the flow table: the kernel's records joined with the tunnel's identities and verdicts"
        )
        time.sleep(1.5)
        from . import ops
        from .node.client import AgentClient

        for n, state, _ in agents:
            click.secho(f"\n  dabba flows --node {name}/{n.name}", bold=True)
            ops.flows(AgentClient(state), {}, "table", False, False)
        click.echo(
            "\n  Cross-node flows went over HBONE (mutual TLS 1.3, each pod's own SPIFFE identity);"
            "\n  the same-node flow went straight through the kernel (path direct): the policy"
            "\n  verdict was the kernel's own, compiled from the node's policies; no proxy."
            "\n  Both ends count the same bytes, in the kernel, whichever path a flow took."
        )
        step("where to look next")
        for cmd, what in (
            ("dabba demo --keep", "keep the lab up to try the commands below"),
            (
                f"dabba flows --node {name}/n1 --summary",
                "bytes per workload pair; --follow streams",
            ),
            (
                f"dabba status --node {name}/n1",
                "agent, tunnel, programs, control plane, certificates",
            ),
            (f"dabba certs --node {name}/n1", "each pod's identity and expiry, the trust roots"),
            (
                f"dabba policy check --node {name}/n2 --from n1-p1 --to n2-p1 --port 8080",
                "the verdict and the rule",
            ),
            (
                f"dabba lab exec {name} n1 -- curl -s {L.node('n1').ip}:15020/metrics",
                "Istio's metrics",
            ),
            ("deploy/grafana, deploy/prometheus", "dashboard and alert rules"),
        ):
            click.echo(f"  {cmd}\n      {what}")
    finally:
        if keep:
            click.echo(f"\nlab {name} left up: `dabba lab down {name}` removes it")
        else:
            labmod.down(name, quiet=True)
            click.echo(f"\nlab {name} removed")


# A receiver and a sender of exact byte counts (each side reads to EOF), run in the pods.
_SINK = """
import socket, sys
ls = socket.create_server((sys.argv[1], int(sys.argv[2])))
c, _ = ls.accept()
n = 0
while b := c.recv(1 << 20):
    n += len(b)
c.sendall(b"x" * int(sys.argv[3]))
c.close()
print(f"{n:,}")
"""
_SOURCE = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(b"y" * int(sys.argv[3]))
s.shutdown(socket.SHUT_WR)
n = 0
while b := s.recv(1 << 20):
    n += len(b)
print(f"{n:,}")
"""


def _status(state_dir, proc):
    if proc is not None and proc.poll() is not None:
        raise DabbaError(f"the agent exited with {proc.returncode}; its log is next to its config")
    try:
        with open(os.path.join(state_dir, "status.json")) as f:
            st = json.load(f)
    except (OSError, ValueError):
        return None
    return st if proc is None or st.get("pid") == proc.pid else None
