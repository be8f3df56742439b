"""Splice (sk_skb verdict on a SOCKHASH): the kernel moves the bytes, user space reads none."""

import json
import subprocess

from tests.conftest import REPO, helper, maps_dir, read_json


def _splice(lab, procs, port, target, delay=0.0):
    n1 = lab.node("n1")
    sp = lab.popen(
        "n1",
        [
            *helper("splicer"),
            "--repo",
            REPO,
            "--maps",
            maps_dir(n1),
            "--listen",
            f"{n1.gateway}:{port}",
            "--target",
            target,
            "--delay",
            str(delay),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(sp)
    read_json(sp, "listening")
    return sp


def _server(lab, procs, pod, port, *args):
    srv = lab.popen(
        pod.name,
        [*helper("xfer"), "server", "--listen", f"{pod.ip}:{port}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(srv)
    read_json(srv, "listening")
    return srv


def test_200mb_each_way_same_sha256_and_splicer_reads_nothing(lab, datapaths, procs):
    client, server, n1 = lab.pod("n1-p1"), lab.pod("n1-p2"), lab.node("n1")
    size = 200 * 1000 * 1000
    srv = _server(lab, procs, server, 7001, "--duplex", str(size))
    sp = _splice(lab, procs, 7001, f"{server.ip}:7001")
    before = datapaths["n1"].stats()["splice_bytes"]
    cli = lab.run(
        client.name,
        [*helper("xfer"), "client", "--connect", f"{n1.gateway}:7001", "--duplex", str(size)],
        timeout=300,
    )
    c, s = json.loads(cli.stdout), read_json(srv, "received", timeout=120)
    assert c["sent"] == c["received"] == s["sent"] == s["received"] == size
    assert c["sha_sent"] == s["sha_received"]
    assert s["sha_sent"] == c["sha_received"]
    done = read_json(sp, "closed", timeout=60)
    assert done["closed"] == "fin"
    # the splicer process read no payload: 400 MB moved, < 64 KiB read
    assert done["rchar_while_paired"] < 65536, done
    assert datapaths["n1"].stats()["splice_bytes"] - before == 2 * size


def test_bytes_sent_before_pairing_and_half_close_are_delivered(lab, datapaths, procs):
    """The client writes and half-closes before the splicer pairs (0.5 s later):
    every byte arrives, the server sees EOF, and its reply comes back."""
    client, server, n1 = lab.pod("n1-p1"), lab.pod("n1-p2"), lab.node("n1")
    srv = _server(lab, procs, server, 7002, "--send", "77777")
    sp = _splice(lab, procs, 7002, f"{server.ip}:7002", delay=0.5)
    cli = lab.run(
        client.name,
        [*helper("xfer"), "client", "--connect", f"{n1.gateway}:7002", "--send", "1234567"],
        timeout=60,
    )
    c, s = json.loads(cli.stdout), read_json(srv, "received")
    assert s["received"] == 1_234_567 and s["sha_received"] == c["sha_sent"]
    assert c["received"] == 77_777 and c["sha_received"] == s["sha_sent"]
    assert read_json(sp, "closed")["closed"] == "fin"


def test_reset_is_propagated(lab, datapaths, procs):
    client, server, n1 = lab.pod("n1-p1"), lab.pod("n1-p2"), lab.node("n1")
    _server(lab, procs, server, 7003, "--reset-after", "0.5")
    sp = _splice(lab, procs, 7003, f"{server.ip}:7003")
    cli = lab.run(
        client.name,
        [*helper("xfer"), "client", "--connect", f"{n1.gateway}:7003", "--send", "5000", "--hold"],
        timeout=60,
    )
    c = json.loads(cli.stdout)
    assert c.get("reset") is True and c["received"] == 0
    assert read_json(sp, "closed")["closed"].startswith("reset")


def test_socket_closed_by_peer_before_pairing_is_refused_cleanly(lab, datapaths):
    """A SOCKHASH takes only ESTABLISHED sockets: pair() says so, and leaves no entry."""
    import socket
    import time

    from agent.bpf.splice import Splicer, SpliceUnavailable

    sp = Splicer(maps_dir(lab.node("n1")))
    ls = socket.create_server(("127.0.0.1", 0))
    c1 = socket.create_connection(ls.getsockname())
    a, _ = ls.accept()
    c2 = socket.create_connection(ls.getsockname())
    b, _ = ls.accept()
    c1.sendall(b"request")
    c1.shutdown(socket.SHUT_WR)  # a is now CLOSE_WAIT
    time.sleep(0.1)
    try:
        import pytest

        with pytest.raises(SpliceUnavailable, match="no longer ESTABLISHED"):
            sp.pair(a, b)
        assert sp.pairs.count() == 0 and sp.sockhash.count() == 0
        assert a.recv(100) == b"request"  # the bytes are still there for a user-space relay
    finally:
        for s in (c1, c2, a, b, ls):
            s.close()
        sp.close()
