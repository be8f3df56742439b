"""Capture (cgroup/connect4): enrolled pods reach the tunnel's listener instead."""

import os

from agent.bpf import abi
from agent.bpf.control import cgroup_id
from tests.conftest import Container, http_server, read_json, stub_tunnel


def test_enrolled_pod_reaches_stub_listener_which_recovers_destination_without_bcc(
    lab, datapaths, procs
):
    n1 = lab.node("n1")
    client, other, server = lab.pod("n1-p1"), lab.pod("n1-p2"), lab.pod("n2-p1")
    ctl = datapaths["n1"]
    ctl.enrol(client.cgroup, 1, abi.WL_CAPTURE | abi.WL_ACCOUNT)
    http_server(lab, procs, server, 8080)
    stub = stub_tunnel(lab, procs, n1)
    try:
        r = lab.run(client.name, ["curl", "-sS", "--max-time", "5", f"http://{server.ip}:8080/"])
        rec = read_json(stub, "found")
        assert rec["found"] is True
        assert rec["orig_ip"] == server.ip
        assert rec["orig_port"] == 8080
        assert rec["cgroup_id"] == cgroup_id(client.cgroup) == os.stat(client.cgroup).st_ino
        assert rec["peer"][0] == client.ip
        assert f'"orig_ip": "{server.ip}"' in r.stdout  # curl got the stub's answer

        # not enrolled: the same request goes straight to the server
        direct = lab.run(
            other.name, ["curl", "-sS", "--max-time", "5", f"http://{server.ip}:8080/"]
        )
        assert "Directory listing" in direct.stdout
        assert read_json(stub, "bcc_imported")["bcc_imported"] is False
    finally:
        ctl.unenrol(client.cgroup)
    assert ctl.stats()["captured"] >= 1


def test_excluded_destination_is_not_captured(lab, datapaths, procs):
    client, server = lab.pod("n1-p2"), lab.pod("n2-p2")
    ctl = datapaths["n1"]
    http_server(lab, procs, server, 8080)
    ctl.enrol(client.cgroup, 2, abi.WL_CAPTURE)
    before = ctl.stats()
    try:
        ctl.set_exclusions([f"{server.ip}/32"], [])
        r = lab.run(client.name, ["curl", "-sS", "--max-time", "5", f"http://{server.ip}:8080/"])
        assert "Directory listing" in r.stdout
        ctl.set_exclusions([], [8080])
        r = lab.run(client.name, ["curl", "-sS", "--max-time", "5", f"http://{server.ip}:8080/"])
        assert "Directory listing" in r.stdout
    finally:
        ctl.set_exclusions([], [])
        ctl.unenrol(client.cgroup)
    after = ctl.stats()
    assert after["excluded"] - before["excluded"] == 2
    assert after["captured"] == before["captured"]


def test_tunnel_mark_is_never_captured(lab, datapaths, procs):
    """Sockets carrying the tunnel's SO_MARK go direct even from an enrolled cgroup."""
    client, server, n1 = lab.pod("n1-p1"), lab.pod("n2-p2"), lab.node("n1")
    http_server(lab, procs, server, 8082)
    ctl = datapaths["n1"]
    ctl.configure(n1.gateway, 15001, tunnel_mark=0x539)
    ctl.enrol(client.cgroup, 3, abi.WL_CAPTURE)
    before = ctl.stats()["captured"]
    code = (
        "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x539);"
        "s.settimeout(3); s.connect((sys.argv[1], 8082)); print(s.getpeername()[0])"
    )
    try:
        r = lab.run(client.name, ["python3", "-c", code, server.ip])
        assert r.stdout.strip() == server.ip  # connected to the server itself, not the tunnel
        assert ctl.stats()["captured"] == before
    finally:
        ctl.unenrol(client.cgroup)
        ctl.configure(n1.gateway, 15001)


def test_a_process_in_a_cgroup_below_the_workloads_is_captured_as_the_workload(
    lab, datapaths, procs
):
    """A Kubernetes pod's containers are cgroups below the pod's, which is what is enrolled:
    connect() from such a cgroup is captured, and the record names the pod's cgroup."""
    n1 = lab.node("n1")
    client, server = lab.pod("n1-p2"), lab.pod("n2-p1")
    ctl = datapaths["n1"]
    ctl.enrol(client.cgroup, 4, abi.WL_CAPTURE | abi.WL_ACCOUNT)
    http_server(lab, procs, server, 8083)
    stub = stub_tunnel(lab, procs, n1)
    ctr = Container(client)
    before = ctl.stats()["captured"]
    try:
        out = ctr.run(["curl", "-sS", "--max-time", "5", f"http://{server.ip}:8083/"])
        rec = read_json(stub, "found")
        assert (rec["found"], rec["orig_ip"], rec["orig_port"]) == (True, server.ip, 8083)
        assert rec["cgroup_id"] == cgroup_id(client.cgroup) != cgroup_id(ctr.cgroup)
        assert f'"orig_ip": "{server.ip}"' in out
        assert ctl.stats()["captured"] == before + 1
    finally:
        ctl.unenrol(client.cgroup)
        ctr.remove()
