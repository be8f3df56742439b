"""Kubernetes pods on a node: found by UID in the kubelet's cgroup tree, enrolled, accounted.

There is no kubelet here. The cgroup folders are made with the kubelet's names, for both of its
cgroup drivers, in the real cgroup v2 hierarchy; the processes in them are real, in real network
namespaces; the agent enrols them in the real datapath and the kernel counts their bytes.
"""

import os
import subprocess
import time

import pytest
import yaml

from agent.bpf.control import cgroup_id
from agent.bpf.features import cgroup2_root
from agent.bpf.flows import FlowSource
from agent.control.proto import control_pb2 as pb
from agent.lab import lab as labmod
from agent.node import config as cfgmod
from agent.node import pods
from agent.node.agent import Agent
from tests.conftest import (
    cgroup_procs,
    helper,
    maps_dir,
    popen_in_cgroup,
    read_json,
    unique,
    wait_for,
)

UID_A = "0f1e2d3c-1111-2222-3333-444455556666"
UID_B = "9a8b7c6d-aaaa-bbbb-cccc-ddddeeeeffff"
UID_C = "12345678-0000-4000-8000-000000000001"


def _rm_tree(root: str) -> None:
    for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda x: -x[0].count("/")):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


def _in_netns(pid: int, netns: str) -> bool:
    """pid has entered netns (it joins the cgroup first, then nsenter switches namespaces)."""
    try:
        a, b = os.stat(f"/proc/{pid}/ns/net"), os.stat(netns)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@pytest.fixture
def kubepods():
    """A kubepods-like cgroup folder of this test's own, removed afterwards."""
    root = os.path.join(cgroup2_root(), unique("kubepods"))
    os.mkdir(root)
    procs = []
    try:
        yield root, procs
    finally:
        for p in procs:
            p.kill()
            p.wait(5)
        _rm_tree(root)
        assert not os.path.exists(root), f"{root} left behind"


@pytest.fixture
def netns():
    name = unique("podns")
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_pod_cgroup_for_both_kubelet_drivers_and_every_qos_class(kubepods):
    root, _ = kubepods
    want = {
        UID_A: f"{root}/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{UID_A.replace('-', '_')}.slice",
        UID_B: f"{root}/besteffort/pod{UID_B}",  # cgroupfs driver
        UID_C: f"{root}/kubepods-pod{UID_C.replace('-', '_')}.slice",  # systemd, Guaranteed
    }
    for path in want.values():
        os.makedirs(os.path.join(path, "ctr-1"))  # a container below the pod, as the runtime does
    assert {uid: pods.pod_cgroup(root, uid) for uid in want} == want
    assert pods.pod_cgroup(root, "00000000-0000-0000-0000-000000000000") is None
    assert pods.pod_cgroup(root, "../x") is None and pods.pod_cgroup(root, "") is None


def test_pod_netns_is_the_runtimes_named_namespace_else_the_oldest_process(
    kubepods, netns, tmp_path
):
    root, procs = kubepods
    pod = os.path.join(
        root, "kubepods-besteffort.slice", f"kubepods-besteffort-pod{UID_A.replace('-', '_')}.slice"
    )
    pause, app = os.path.join(pod, "pause"), os.path.join(pod, "app")
    os.makedirs(pause)
    os.makedirs(app)
    assert pods.pod_netns(pod) is None  # no process yet: nothing to tell
    first = popen_in_cgroup(pause, ["sleep", "60"], f"/run/netns/{netns}")
    procs.append(first)
    wait_for(lambda: _in_netns(first.pid, f"/run/netns/{netns}"), 5, what="pause in its netns")
    time.sleep(0.05)  # a later start time (clock ticks) for the app
    second = popen_in_cgroup(app, ["sleep", "60"], f"/run/netns/{netns}")
    procs.append(second)
    wait_for(lambda: _in_netns(second.pid, f"/run/netns/{netns}"), 5, what="app in its netns")
    # the runtime's name for it (containerd: /var/run/netns/cni-...), found by inode
    assert pods.pod_netns(pod) == f"/var/run/netns/{netns}"
    # without such a name: the oldest process's namespace (the sandbox's)
    assert pods.pod_netns(pod, netns_dir=str(tmp_path)) == f"/proc/{first.pid}/ns/net"
    st, want = os.stat(f"/proc/{first.pid}/ns/net"), os.stat(f"/run/netns/{netns}")
    assert (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino)


def test_a_pod_in_the_nodes_own_namespace_gets_no_netns(kubepods):
    root, procs = kubepods
    pod = os.path.join(root, f"pod{UID_B}")
    os.makedirs(pod)
    procs.append(popen_in_cgroup(pod, ["sleep", "60"]))  # host network
    wait_for(lambda: cgroup_procs(pod), 5, what="process")
    assert pods.pod_netns(pod) is None  # never steer the node's own namespace


def _snapshot(version: int, workloads: list[pb.Workload]) -> pb.Snapshot:
    return pb.Snapshot(version=version, trust_domain="cluster.local", workloads=workloads)


def test_agent_enrols_a_pod_found_by_uid_and_the_kernel_counts_its_bytes(lab, procs, tmp_path):
    """The control plane names a pod by UID only; the agent finds its kubelet-made cgroup below
    its own cgroup, enrols it, steers its namespace; the pod's connection is accounted exactly;
    a snapshot without the pod unenrols it and removes the steering."""
    n1, client, server = lab.node("n1"), lab.pod("n1-p1"), lab.pod("n2-p1")
    pod_cg = os.path.join(n1.cgroup, "kubepods-besteffort.slice",
                          f"kubepods-besteffort-pod{UID_A.replace('-', '_')}.slice")  # fmt: skip
    ctr = os.path.join(pod_cg, "ctr")
    os.makedirs(ctr)
    cfg = labmod.agent_config(lab, "n1")
    cfg["workloads"] = []  # none from the config: the pod comes from the "control plane"
    cfg["capture"] = {"enabled": False}  # no tunnel here: account only
    cfg["state_dir"] = str(tmp_path / "state")
    cfg_path = tmp_path / "agent.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    agent = Agent(cfgmod.load(str(cfg_path)))
    pause = None
    src = None
    try:
        agent.start()
        # the pod's sandbox process: in the pod's cgroup and in n1-p1's network namespace
        ns = f"/run/netns/{client.netns}"
        pause = popen_in_cgroup(ctr, ["sleep", "120"], ns)
        wait_for(lambda: cgroup_procs(ctr) and _in_netns(pause.pid, ns), 5,
                 what="the pod's process in the pod's namespace")  # fmt: skip
        w = pb.Workload(name="web-abcde", namespace="shop", service_account="web", node="n1",
                        ip=client.ip, mtls_mode="PERMISSIVE", pod_uid=UID_A,
                        spiffe_id="spiffe://cluster.local/ns/shop/sa/web")  # fmt: skip
        other = pb.Workload(name="db-1", namespace="shop", service_account="db", node="n2",
                            ip=server.ip, pod_uid=UID_B)  # fmt: skip
        agent.apply_snapshot(_snapshot(1, [w, other]), {"shop/web-abcde": object()})
        cg = cgroup_id(pod_cg)
        assert agent.workload_ids == {cg: "shop/web-abcde"}
        assert set(agent.ctl.workloads()) == {cg}
        assert agent._pods == {"shop/web-abcde": (pod_cg, f"/var/run/netns/{client.netns}")}
        ino = os.stat(f"/run/netns/{client.netns}").st_ino
        links = os.listdir(agent.dp.pins.links)
        assert [f for f in links if f.endswith(f"_{ino}")], links  # sk_lookup on the pod's netns

        srv = lab.popen(server.name, [*helper("xfer"), "server", "--listen", f"{server.ip}:9300",
                                      "--send", "4321"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        procs.append(srv)
        read_json(srv, "listening")
        cli = popen_in_cgroup(ctr, [*helper("xfer"), "client", "--connect", f"{server.ip}:9300",
                               "--send", "123457"], f"/run/netns/{client.netns}")  # fmt: skip
        procs.append(cli)
        got = read_json(cli, "received")
        assert (got["sent"], got["received"]) == (123457, 4321)
        src = FlowSource(maps_dir(n1))
        recs = wait_for(
            lambda: [r for r in src.closed(200) if r.dst == (server.ip, 9300)], 10,
            what="the pod's closed flow",
        )  # fmt: skip
        r = recs[0]
        assert (r.cgroup_id, r.bytes_sent, r.bytes_received) == (cg, 123457, 4321)

        # the pod is gone from the snapshot: unenrolled, its namespace no longer steered
        agent.apply_snapshot(_snapshot(2, [other]), {})
        assert agent.workload_ids == {} and agent.ctl.workloads() == {}
        assert not [f for f in os.listdir(agent.dp.pins.links) if f.endswith(f"_{ino}")]
        assert agent._pods == {}
    finally:
        if src is not None:
            src.close()
        if pause is not None:
            pause.kill()
            pause.wait(5)
        agent.stop.set()
        agent.dp.remove()
        _rm_tree(os.path.join(n1.cgroup, "kubepods-besteffort.slice"))


def test_agent_retries_a_pod_whose_cgroup_appears_after_the_snapshot(lab, tmp_path):
    n1 = lab.node("n1")
    cfg = labmod.agent_config(lab, "n1")
    cfg["workloads"] = []
    cfg["capture"] = {"enabled": False}
    cfg["state_dir"] = str(tmp_path / "state")
    cfg_path = tmp_path / "agent.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    agent = Agent(cfgmod.load(str(cfg_path)))
    pod_cg = os.path.join(n1.cgroup, f"pod{UID_C}")
    try:
        agent.start()
        w = pb.Workload(name="late", namespace="default", service_account="late", node="n1",
                        ip="10.20.1.99", pod_uid=UID_C)  # fmt: skip
        agent.apply_snapshot(_snapshot(1, [w]), {"default/late": object()})
        assert agent.workload_ids == {} and agent._pods_waiting  # not here yet: waits
        os.mkdir(pod_cg)
        agent.apply_snapshot(*agent._last)  # what retry_pods does every 5 s
        assert agent.workload_ids == {cgroup_id(pod_cg): "default/late"}
        assert agent._pods_waiting  # enrolled; no process yet, so no netns to steer
    finally:
        agent.stop.set()
        agent.dp.remove()
        if os.path.isdir(pod_cg):
            os.rmdir(pod_cg)
