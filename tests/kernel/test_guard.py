"""Ingress guard (cgroup_skb/ingress): STRICT pods accept connections only from the tunnel."""

from agent.bpf import abi
from agent.bpf.control import cgroup_id
from tests.conftest import Container, http_server, wait_for

CONNECT = (
    "import socket,sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()\n"
    "    print('connected')\n"
    "except OSError as e:\n"
    "    print('failed', type(e).__name__)\n"
)


def _try(lab, target, ip, port, timeout):
    return lab.run(target, ["python3", "-c", CONNECT, ip, str(port), str(timeout)]).stdout.strip()


def test_plaintext_from_other_node_dropped_and_counted_tunnel_address_accepted(
    lab, datapaths, procs
):
    strict, peer = lab.pod("n2-p2"), lab.pod("n1-p1")
    ctl = datapaths["n2"]
    http_server(lab, procs, strict, 8081)
    cg = cgroup_id(strict.cgroup)
    # PERMISSIVE (enrolled, not STRICT): plaintext from another node is accepted
    ctl.enrol(strict.cgroup, 22, abi.WL_ACCOUNT)
    assert _try(lab, peer.name, strict.ip, 8081, 3) == "connected"
    before = ctl.stats()["guard_drop"]
    ctl.enrol(strict.cgroup, 22, abi.WL_ACCOUNT | abi.WL_STRICT)
    try:
        assert _try(lab, peer.name, strict.ip, 8081, 2.5).startswith("failed")
        drops = ctl.guard_drops().get(cg, 0)
        assert drops >= 1  # the SYN and its retransmissions
        assert ctl.stats()["guard_drop"] - before == drops
        # from the node, whose source address is the tunnel's (10.20.2.1), it is accepted
        assert _try(lab, "n2", strict.ip, 8081, 3) == "connected"
        assert ctl.guard_drops().get(cg, 0) == drops
    finally:
        ctl.unenrol(strict.cgroup)
    # not STRICT any more: accepted again
    assert _try(lab, peer.name, strict.ip, 8081, 3) == "connected"


LISTEN = (
    "import socket,sys,time\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64); print('listening', flush=True)\n"
    "time.sleep(120)\n"
)


def test_a_listener_in_a_cgroup_below_a_strict_workload_is_guarded(lab, datapaths):
    """A STRICT pod's server runs in its container's cgroup, below the enrolled pod cgroup:
    plaintext from another node is dropped and counted under the pod's cgroup id."""
    strict, peer = lab.pod("n2-p1"), lab.pod("n1-p2")
    ctl = datapaths["n2"]
    ctr = Container(strict)
    cg = cgroup_id(strict.cgroup)
    try:
        srv = ctr.popen(["python3", "-c", LISTEN, strict.ip, "8084"])
        wait_for(lambda: srv.stdout.readline().strip() == "listening", 10, what="listener")
        ctl.enrol(strict.cgroup, 23, abi.WL_ACCOUNT)
        assert _try(lab, peer.name, strict.ip, 8084, 3) == "connected"
        ctl.enrol(strict.cgroup, 23, abi.WL_ACCOUNT | abi.WL_STRICT)
        assert _try(lab, peer.name, strict.ip, 8084, 2.5).startswith("failed")
        drops = ctl.guard_drops()
        assert drops.get(cg, 0) >= 1 and cgroup_id(ctr.cgroup) not in drops
        assert _try(lab, "n2", strict.ip, 8084, 3) == "connected"  # from the tunnel's address
    finally:
        ctl.unenrol(strict.cgroup)
        ctr.remove()
