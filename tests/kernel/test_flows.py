"""Flow accounting (sockops): exact payload bytes, RTT, retransmits, the close event."""

import subprocess
import time

from agent.bpf import abi
from agent.bpf.control import cgroup_id
from agent.bpf.flows import FlowSource
from tests.conftest import helper, maps_dir, read_json


def _closed_flows(src, want, timeout=10.0):
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(got) < want:
        got.extend(src.closed(timeout_ms=200))
    return got


def test_exact_bytes_both_directions_and_close_event(lab, datapaths, procs):
    client, server = lab.pod("n1-p1"), lab.pod("n2-p1")
    ctl1, ctl2 = datapaths["n1"], datapaths["n2"]
    # account both ends; no capture, so the flow is pod to pod
    ctl1.enrol(client.cgroup, 11, abi.WL_ACCOUNT)
    ctl2.enrol(server.cgroup, 21, abi.WL_ACCOUNT)
    src1, src2 = FlowSource(maps_dir(lab.node("n1"))), FlowSource(maps_dir(lab.node("n2")))
    list(src1.closed()), list(src2.closed())  # drop events of earlier tests
    try:
        srv = lab.popen(
            server.name,
            [*helper("xfer"), "server", "--listen", f"{server.ip}:9000", "--send", "123456"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(srv)
        read_json(srv, "listening")
        cli = lab.run(
            client.name,
            [*helper("xfer"), "client", "--connect", f"{server.ip}:9000", "--send", "10000000"],
        )
        import json

        c = json.loads(cli.stdout)
        s = read_json(srv, "received")
        assert (c["sent"], c["received"]) == (10_000_000, 123_456)
        assert (s["received"], s["sent"]) == (10_000_000, 123_456)

        out = [f for f in _closed_flows(src1, 1) if f.dst == (server.ip, 9000)]
        inn = [f for f in _closed_flows(src2, 1) if f.src == (server.ip, 9000)]
        assert len(out) == 1 and len(inn) == 1
        o, i = out[0], inn[0]
        assert o.direction == "outbound" and i.direction == "inbound"
        assert o.bytes_sent == 10_000_000 and o.bytes_received == 123_456
        assert i.bytes_received == 10_000_000 and i.bytes_sent == 123_456
        assert o.cgroup_id == cgroup_id(client.cgroup) and i.cgroup_id == cgroup_id(server.cgroup)
        assert o.src == tuple(c["local"]) and o.dst == (server.ip, 9000)
        assert o.captured is False and o.orig_dst == o.dst
        for f in (o, i):
            assert f.close == "fin", f
            assert f.srtt_us > 0
            assert f.retrans >= 0 and f.segs_out > 0 and f.segs_in > 0
            assert f.end is not None and f.end >= f.start
        # 10 MB in at most ~64 KiB segments (GSO) and at least 1448-byte ones
        assert 10_000_000 // 65536 <= o.segs_out <= 10_000_000 // 1000 + 100
        # nothing is left behind in the live table
        assert o.cookie not in {f.cookie for f in src1.live()}
    finally:
        ctl1.unenrol(client.cgroup)
        ctl2.unenrol(server.cgroup)
        src1.close()
        src2.close()


def test_reset_and_refused_close_reasons(lab, datapaths, procs):
    client, server = lab.pod("n1-p2"), lab.pod("n2-p2")
    ctl = datapaths["n1"]
    ctl.enrol(client.cgroup, 12, abi.WL_ACCOUNT)
    src = FlowSource(maps_dir(lab.node("n1")))
    list(src.closed())
    try:
        # refused: nothing listens on 9999
        r = lab.run(
            client.name,
            ["curl", "-sS", "--max-time", "3", f"http://{server.ip}:9999/"],
            check=False,
        )
        assert r.returncode != 0
        # reset: the server resets the connection after it is established
        srv = lab.popen(
            server.name,
            [*helper("xfer"), "server", "--listen", f"{server.ip}:9001", "--reset-after", "0.2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(srv)
        read_json(srv, "listening")
        lab.run(
            client.name,
            [*helper("xfer"), "client", "--connect", f"{server.ip}:9001", "--send", "1000"],
            check=False,
        )
        flows = _closed_flows(src, 2)
        by_port = {f.dst[1]: f for f in flows}
        assert by_port[9999].close == "refused"
        assert by_port[9001].close == "reset"
        assert by_port[9001].bytes_sent == 1000
    finally:
        ctl.unenrol(client.cgroup)
        src.close()
