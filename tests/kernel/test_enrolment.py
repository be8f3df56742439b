"""Enrolment fails closed: a workload is captured and guarded before the control plane
has said anything and before its certificate arrives."""

import subprocess
import sys

import yaml

from agent.bpf import abi
from agent.bpf.loader import Datapath, DatapathControl, cgroup_id
from agent.lab import lab as labmod
from tests.conftest import http_server, wait_for
from tests.kernel.test_escape import _tcp, probe

DABBA = [sys.executable, "-m", "agent.cli"]


def test_workloads_are_held_while_the_control_plane_is_unreachable(lab, procs, tmp_path):
    """Before: with a control plane configured, the agent enrolled nothing until a snapshot
    and a certificate arrived, so at a first boot with the control plane unreachable every pod
    ran outside the mesh: plaintext out and in, no identity, no policy."""
    n1, client, server, peer = lab.node("n1"), lab.pod("n1-p1"), lab.pod("n1-p2"), lab.pod("n2-p1")
    http_server(lab, procs, peer, 8080)
    http_server(lab, procs, server, 8081)
    assert probe(lab, client.name, [_tcp(peer.ip, 8080)]) == ["connected"]  # no mesh yet
    ca = tmp_path / "ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(tmp_path / "ca.key"), "-out", str(ca), "-days", "1",
         "-subj", "/CN=unreachable"],
        check=True, capture_output=True,
    )  # fmt: skip
    (tmp_path / "token").write_text("not-used-yet\n")
    cfg = labmod.agent_config(lab, "n1")
    cfg["control"] = {
        "address": f"{n1.gateway}:1",  # nothing listens: the control plane is unreachable
        "join_address": f"{n1.gateway}:1",
        "ca_file": str(ca),
        "token_file": str(tmp_path / "token"),
        "node_address": n1.ip,
    }
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(cfg))
    agent = lab.popen(
        "n1", [*DABBA, "agent", "run", "--config", str(tmp_path / "agent.yaml")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    procs.append(agent)
    ctl = DatapathControl(Datapath(n1.bpf_node, n1.cgroup))
    held = abi.WL_CAPTURE | abi.WL_ACCOUNT | abi.WL_STRICT
    want = {cgroup_id(p.cgroup) for p in (client, server)}

    def enrolled():
        try:
            return {cg for cg, (_, flags) in ctl.workloads().items() if flags == held} == want
        except Exception:  # the datapath is still being loaded
            return False

    wait_for(enrolled, 90, what="the configured workloads to be held")
    before = ctl.stats()
    # out: captured, and refused while no tunnel listens (never direct)
    assert probe(lab, client.name, [_tcp(peer.ip, 8080)]) == ["error ECONNREFUSED"]
    # in: STRICT, plaintext from another node dropped
    assert probe(lab, peer.name, [_tcp(server.ip, 8081, timeout=2)]) == ["timeout"]
    after = ctl.stats()
    assert after["captured"] - before["captured"] == 1
    assert after["own_no_tunnel"] - before["own_no_tunnel"] == 1
    assert after["guard_drop"] > before["guard_drop"]
    agent.kill()
    agent.wait(10)
