"""Enrolment fails closed: a workload is captured and guarded before the control plane
has said anything and before its certificate arrives."""

import os
import subprocess
import sys

import yaml

from agent.bpf import abi
from agent.bpf.control import DatapathControl, cgroup_id
from agent.bpf.loader import Datapath, PlainProgram
from agent.control.proto import control_pb2 as pb
from agent.lab import lab as labmod
from tests.conftest import http_server, wait_for
from tests.kernel.test_escape import _tcp, probe

DABBA = [sys.executable, "-m", "agent.cli"]


def _unreachable_control(lab, tmp_path) -> dict:
    """n1's agent config with a control plane that never answers."""
    n1 = lab.node("n1")
    ca = tmp_path / "ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(tmp_path / "ca.key"), "-out", str(ca), "-days", "1",
         "-subj", "/CN=unreachable"],
        check=True, capture_output=True,
    )  # fmt: skip
    (tmp_path / "token").write_text("not-used-yet\n")
    cfg = labmod.agent_config(lab, "n1")
    cfg["state_dir"] = str(tmp_path / "state")
    cfg["control"] = {
        "address": f"{n1.gateway}:1",  # nothing listens: the control plane is unreachable
        "join_address": f"{n1.gateway}:1",
        "ca_file": str(ca),
        "token_file": str(tmp_path / "token"),
        "node_address": n1.ip,
    }
    return cfg


def _run_agent(lab, procs, tmp_path, cfg) -> DatapathControl:
    n1 = lab.node("n1")
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(cfg))
    agent = lab.popen(
        "n1", [*DABBA, "agent", "run", "--config", str(tmp_path / "agent.yaml")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    procs.append(agent)
    return DatapathControl(Datapath(n1.bpf_node, n1.cgroup))


def _flags(ctl) -> dict[int, int]:
    try:
        return {cg: flags for cg, (_, flags) in ctl.workloads().items()}
    except Exception:  # the datapath is still being loaded
        return {}


def test_workloads_are_held_while_the_control_plane_is_unreachable(lab, procs, tmp_path):
    """Before: with a control plane configured, the agent enrolled nothing until a snapshot
    and a certificate arrived, so at a first boot with the control plane unreachable every pod
    ran outside the mesh: plaintext out and in, no identity, no policy."""
    client, server, peer = lab.pod("n1-p1"), lab.pod("n1-p2"), lab.pod("n2-p1")
    http_server(lab, procs, peer, 8080)
    http_server(lab, procs, server, 8081)
    assert probe(lab, client.name, [_tcp(peer.ip, 8080)]) == ["connected"]  # no mesh yet
    ctl = _run_agent(lab, procs, tmp_path, _unreachable_control(lab, tmp_path))
    held = abi.WL_CAPTURE | abi.WL_ACCOUNT | abi.WL_STRICT
    want = {cgroup_id(p.cgroup): held for p in (client, server)}
    wait_for(lambda: _flags(ctl) == want, 90, what="the configured workloads to be held")
    before = ctl.stats()
    # out: captured, and refused while no tunnel listens (never direct)
    assert probe(lab, client.name, [_tcp(peer.ip, 8080)]) == ["error ECONNREFUSED"]
    # in: STRICT, plaintext from another node dropped
    assert probe(lab, peer.name, [_tcp(server.ip, 8081, timeout=2)]) == ["timeout"]
    after = ctl.stats()
    assert after["captured"] - before["captured"] == 1
    assert after["own_no_tunnel"] - before["own_no_tunnel"] == 1
    assert after["guard_drop"] > before["guard_drop"]


def test_a_workload_of_the_snapshot_is_held_until_its_certificate_arrives(lab, procs, tmp_path):
    """Before: a workload of the snapshot whose certificate had not arrived was not enrolled
    at all, so it ran outside the mesh until the certificate came, indefinitely when the
    control plane could not sign it. Now it is held: captured and STRICT, never steered."""
    n1, client, server, peer = lab.node("n1"), lab.pod("n1-p1"), lab.pod("n1-p2"), lab.pod("n2-p1")
    cfg = _unreachable_control(lab, tmp_path)
    cfg["workloads"] = []  # the snapshot says which workloads exist, as in Kubernetes
    os.makedirs(cfg["state_dir"], exist_ok=True)
    snap = pb.Snapshot(version=7, trust_domain="cluster.local")
    for p in (client, server):
        snap.workloads.append(
            pb.Workload(
                name=p.name, namespace=p.namespace, service_account=p.service_account,
                node="n1", ip=p.ip, cgroup=p.cgroup, netns=f"/run/netns/{p.netns}",
                mtls_mode="PERMISSIVE",
            )
        )  # fmt: skip
    with open(os.path.join(cfg["state_dir"], "snapshot.pb"), "wb") as f:
        f.write(snap.SerializeToString())
    ctl = DatapathControl(Datapath(n1.bpf_node, n1.cgroup))
    if ctl.dp.pins.exists():  # what an earlier test enrolled: this agent must do it itself
        for cg in ctl.workloads():
            ctl.unenrol(cg)
    ctl = _run_agent(lab, procs, tmp_path, cfg)
    held = abi.WL_CAPTURE | abi.WL_ACCOUNT | abi.WL_STRICT
    want = {cgroup_id(p.cgroup): held for p in (client, server)}
    wait_for(lambda: _flags(ctl) == want, 90, what="the snapshot's workloads to be held")
    # PERMISSIVE in the snapshot, but no certificate: not steered to a 15006 (there is none)
    plain = next(p for p in ctl.dp.programs if isinstance(p, PlainProgram))
    assert plain.netns_links() == 0
    assert probe(lab, client.name, [_tcp(peer.ip, 8080)]) == ["error ECONNREFUSED"]
