"""Kubernetes mode end to end: the control plane lists the cluster with the real `kubernetes`
client, the nodes find each pod by its UID (kubelet-shaped cgroups), and traffic goes through
the mesh.

No Kubernetes API server can run on this machine: agent/lab/kubeapi.py stands in for one (list
endpoints over HTTP, objects in the API's JSON shape). Everything else is real: the lab's pods
live in cgroups named as the kubelet names them (kubepods-besteffort-pod<uid>.slice), agents
enrol them by UID, tunnels carry HBONE between nodes.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from agent.lab import lab as labmod
from agent.lab import mesh, spec
from tests.conftest import helper, read_json, unique, wait_for

TD = "cluster.local"


@pytest.fixture(scope="module")
def klab():
    name = unique("kb")
    sp = spec.default_spec(2, 1)
    sp.kubelet_cgroups = True
    L = labmod.up(name, sp)
    try:
        yield L, mesh.up(L, capture=True, source="kubernetes")
    finally:
        labmod.down(name, quiet=True)


def _dabba(*args, check=True):
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=60
    )
    assert not check or r.returncode == 0, f"dabba {' '.join(args)}: {r.stderr}"
    return r


def _serve(L, procs, port, answer):
    """A server in n2-p1 that reads each request to its end, then answers `answer` bytes."""
    dst = L.pod("n2-p1")
    srv = L.popen("n2-p1", ["socat", f"TCP-LISTEN:{port},bind={dst.ip},fork,reuseaddr",
                            f"SYSTEM:cat >/dev/null; head -c {answer} /dev/zero"],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    procs.append(srv)
    wait_for(lambda: L.run("n2-p1", ["ss", "-Hltn", f"src {dst.ip}:{port}"]).stdout.strip(), 10,
             what="the server")  # fmt: skip


def _send(L, port, send):
    """n1-p1 sends `send` bytes to n2-p1:port and reads the answer: bytes received, or None
    when the connection failed (refused, reset: what a denial looks like to the client)."""
    r = L.run("n1-p1", [*helper("xfer"), "client", "--connect", f"{L.pod('n2-p1').ip}:{port}",
                        "--send", str(send)], check=False, timeout=60)  # fmt: skip
    if r.returncode != 0:
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])["received"]


def _xfer(L, procs, port, send=100_000, answer=3_333):
    """client n1-p1 -> server n2-p1: what each side counted, or the client's failure."""
    dst = L.pod("n2-p1")
    srv = L.popen("n2-p1", [*helper("xfer"), "server", "--listen", f"{dst.ip}:{port}",
                            "--send", str(answer)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  text=True)  # fmt: skip
    procs.append(srv)
    wait_for(lambda: L.run("n2-p1", ["ss", "-Hltn", f"src {dst.ip}:{port}"]).stdout.strip(), 10,
             what="the server")  # fmt: skip
    r = L.run("n1-p1", [*helper("xfer"), "client", "--connect", f"{dst.ip}:{port}",
                        "--send", str(send)], check=False, timeout=60)  # fmt: skip
    if r.returncode != 0:
        srv.kill()
        return None, r.stderr.strip().splitlines()[-1:]
    return json.loads(r.stdout.strip().splitlines()[-1]), read_json(srv, "received")


def test_pods_found_by_uid_are_meshed_with_exact_bytes_and_identities(klab, procs):
    """Before: the tunnel knew local workloads only by a cgroup path in the snapshot, which the
    Kubernetes source never sends (it sends the pod's UID): every captured connection of a
    Kubernetes pod was reset."""
    L, _ = klab
    client, server = L.pod("n1-p1"), L.pod("n2-p1")
    assert os.path.basename(client.cgroup).startswith("kubepods-besteffort-pod")
    got, srv = _xfer(L, procs, 9100)
    assert got is not None, srv
    assert (got["sent"], got["received"], srv["received"], srv["sent"]) == (
        100_000, 3_333, 100_000, 3_333)  # fmt: skip
    spiffe = {p.name: f"spiffe://{TD}/ns/{p.namespace}/sa/{p.service_account}"
              for p in (client, server)}  # fmt: skip

    def flow():
        fs = json.loads(_dabba("flows", "--node", f"{L.name}/n1", "--port", "9100", "-o",
                               "json").stdout)["flows"]  # fmt: skip
        return fs[0] if len(fs) == 1 else None

    f = wait_for(flow, 10, what="the flow on n1")
    assert (f["src"]["identity"], f["dst"]["identity"]) == (spiffe["n1-p1"], spiffe["n2-p1"])
    assert f["path"] == "hbone", f


def test_a_policy_added_in_the_cluster_is_enforced_and_the_last_good_state_outlives_the_api(
    klab, procs
):
    """A DENY added through the API stand-in is enforced; the API server going away keeps the
    last good state (visibly), and when it is back, changes flow again."""
    L, procs_ = klab
    objs = mesh.kube_objects(L)
    deny = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-9200", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "n2-p1"}},
            "action": "DENY",
            "rules": [{"to": [{"operation": {"ports": ["9200"]}}]}],
        },
    }
    for port in (9200, 9201, 9202):
        _serve(L, procs, port, 10)
    assert _send(L, 9200, 10) == 10  # allowed before the policy
    mesh.write_kube_objects(L, {**objs, "authorizationpolicies": [deny]})
    wait_for(lambda: _send(L, 9200, 10) in (None, 0), 30, interval=1,
             what="the DENY policy to be enforced")  # fmt: skip
    assert _send(L, 9201, 1000) == 10  # another port: still allowed

    control_state = mesh.paths(L)["control"]
    procs_["kubeapi"].send_signal(signal.SIGTERM)
    procs_["kubeapi"].wait(10)
    r = wait_for(lambda: (x := _dabba("control", "status", "--state-dir", control_state,
                                      check=False)).returncode == 1 and x, 30,
                 what="the control plane to say its source fails")  # fmt: skip
    assert "problem: the registry has been failing for" in r.stdout, r.stdout
    # the last good state stays in force: the DENY holds, the rest flows
    assert _send(L, 9200, 10) in (None, 0)
    assert _send(L, 9202, 1000) == 10

    # the API server back, the policy removed: the list resumes and the change arrives
    mesh.write_kube_objects(L, objs)
    procs_["kubeapi"] = mesh.start_kube_api(L)
    wait_for(lambda: _dabba("control", "status", "--state-dir", control_state,
                            check=False).returncode == 0, 30, what="the source to recover")  # fmt: skip
    wait_for(lambda: _send(L, 9200, 10) == 10, 30, interval=1, what="the DENY to be lifted")
