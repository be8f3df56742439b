"""A node takes from a snapshot only workloads whose names can be folders and whose identity is
theirs: a hostile or broken control plane cannot make it write outside its certificate folder
or crash it building a CSR (before: a namespace '..' with name 'identity' made a node write
into, then remove, its own identity folder; a non-ASCII service account crash-looped it)."""

from agent.control.proto import control_pb2 as pb
from agent.node.sync import ControlSync, workload_error

TD = "cluster.local"


def _w(ns, name, sa, spiffe=None, node="n1"):
    return pb.Workload(
        namespace=ns,
        name=name,
        service_account=sa,
        node=node,
        spiffe_id=spiffe or f"spiffe://{TD}/ns/{ns}/sa/{sa}",
    )


def test_only_well_formed_workloads_of_this_node_are_taken(tmp_path):
    sync = ControlSync("n1", "10.0.0.1", "x:1", "x:2", "ca", "tok", str(tmp_path), lambda *a: None)
    good = _w("shop", "web-1", "web")
    hostile = [
        _w("..", "identity", "x"),
        _w("shop", "../../identity", "x"),
        _w("caf\u00e9", "web", "web"),
        _w("shop", "web-2", "s\u00e4"),
        _w("shop", "web-3", "web", spiffe=f"spiffe://{TD}/node/n2"),  # not its identity
        _w("shop", "web-4", "web", spiffe=f"spiffe://{TD}/ns/other/sa/web"),  # another's
    ]
    snap = pb.Snapshot(workloads=[good, *hostile, _w("shop", "elsewhere", "web", node="n2")])
    assert [w.name for w in sync._local(snap)] == ["web-1"]
    assert all(workload_error(w) for w in hostile)
    assert workload_error(good) is None
