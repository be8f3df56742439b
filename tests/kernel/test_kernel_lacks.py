"""Never weaker than the tunnel (issue "same-node kernel path", item 8): the direct path needs
the kernel to end a socket from outside (SOCK_DESTROY), because no proxy holds a direct flow
that a policy change denies. The agent asks the kernel at start; where it lacks it, same-node
connections keep the tunnel's path and `dabba status` says why."""

from types import SimpleNamespace

from agent.control.proto import control_pb2 as pb
from agent.node.config import CaptureConfig
from agent.node.destroy import supported
from agent.node.samenode import SameNode


def test_this_kernel_can_end_a_socket_from_outside():
    assert supported() == ""  # CONFIG_INET_DIAG_DESTROY=y here (a measured fact of the machine)


class _Ctl:
    def __init__(self):
        self.written = []

    def set_verdicts(self, entries):
        self.written.append(entries)
        return 0 if not entries else 1


def test_a_kernel_without_sock_destroy_keeps_same_node_connections_on_the_tunnel():
    """A stand-in for such a kernel (this one has it): the probe's answer is set, not asked.
    Then no verdict is put in force, so connect() finds none and every same-node connection is
    captured to the tunnel, and the status says which feature is missing."""
    w = pb.Workload(name="a", namespace="default", node="n1", ip="10.0.0.1", service_account="a")
    agent = SimpleNamespace(
        cfg=SimpleNamespace(capture=CaptureConfig(same_node="direct"), node="n1"),
        ctl=_Ctl(),
        workload_ids={7: "default/a"},
        _by_key={"default/a": w},
        live_records=list,
    )
    sn = SameNode(agent)
    sn._lacks = "this kernel cannot end a socket from outside (...)"
    snap = pb.Snapshot(workloads=[w])
    sn.sync(snap, {"default/a": object()})
    assert agent.ctl.written == [{}]  # generation 0: no verdicts, the tunnel decides
    st = sn.status()
    assert st["mode"] == "tunnel" and st["kernel_lacks"].startswith("this kernel cannot")
    # the same node with the feature: its verdicts are compiled (one wildcard entry, allowed)
    sn2 = SameNode(agent)
    sn2._lacks = ""
    sn2.sync(snap, {"default/a": object()})
    assert len(agent.ctl.written[-1]) == 1 and sn2.status()["mode"] == "direct"
