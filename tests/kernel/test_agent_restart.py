"""Agent restart: pinned programs keep capturing and counting; nothing is attached twice."""

import json
import os
import signal
import subprocess
import sys

import yaml

from agent.bpf.flows import FlowSource
from agent.lab import lab as labmod
from tests.conftest import helper, maps_dir, read_json, wait_for

DABBA = [sys.executable, "-m", "agent.cli"]


def _start_agent(lab, cfg_path, procs):
    p = lab.popen(
        "n1",
        [*DABBA, "agent", "run", "--config", cfg_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(p)
    return p


def _status(state_dir, pid):
    path = os.path.join(state_dir, "status.json")
    try:
        with open(path) as f:
            st = json.load(f)
    except (OSError, ValueError):
        return None
    return st if st["pid"] == pid else None


def _flow(src, dst):
    for f in src.live():
        if f.dst == dst:
            return f
    return None


def test_restart_keeps_connection_counting_and_attaches_once(lab, procs, tmp_path):
    n1, client, server = lab.node("n1"), lab.pod("n1-p1"), lab.pod("n2-p1")
    cfg = labmod.agent_config(lab, "n1")
    for w in cfg["workloads"]:
        w["capture"] = False  # no tunnel in this test: account only
    cfg_path = tmp_path / "agent.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    state = cfg["state_dir"]

    a1 = _start_agent(lab, str(cfg_path), procs)
    st1 = wait_for(lambda: _status(state, a1.pid), 60, what="first agent status")
    assert {r["action"] for r in st1["load"]} == {"loaded"}
    # flow identities are not world-readable (before: 0755 folder, 0644 files)
    modes = {f: os.stat(os.path.join(state, f)).st_mode & 0o777 for f in ("", "status.json")}
    assert modes == {"": 0o750, "status.json": 0o640}, {k: oct(v) for k, v in modes.items()}

    srv = lab.popen(
        server.name,
        [*helper("xfer"), "server", "--listen", f"{server.ip}:9100"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(srv)
    read_json(srv, "listening")
    cli = lab.popen(
        client.name,
        [*helper("xfer"), "client", "--connect", f"{server.ip}:9100", "--stream"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(cli)

    src = FlowSource(maps_dir(n1))
    try:
        dst = (server.ip, 9100)
        f1 = wait_for(
            lambda: (f := _flow(src, dst)) and f.bytes_sent > 0 and f, 10, what="live flow"
        )

        a1.send_signal(signal.SIGTERM)
        assert a1.wait(10) == 0
        # agent down: the connection flows and the kernel keeps counting
        f2 = wait_for(
            lambda: (f := _flow(src, dst)) and f.bytes_sent > f1.bytes_sent + 200_000 and f,
            10,
            what="bytes counted while the agent is down",
        )
        assert f2.cookie == f1.cookie and abs(f2.start - f1.start) < 1e-3  # same flow record

        a2 = _start_agent(lab, str(cfg_path), procs)
        st2 = wait_for(lambda: _status(state, a2.pid), 30, what="second agent status")
        assert {r["action"] for r in st2["load"]} == {
            "adopted"
        }  # nothing compiled or attached again

        r = subprocess.run(
            [*DABBA, "bpf", "status", "--node", n1.bpf_node, "-o", "json"],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        progs = json.loads(r.stdout)["programs"]
        cgroup_progs = [p for p in progs if not p["elsewhere"]]
        assert len(progs) == 14 and all(p["attached"] == 1 for p in cgroup_progs), progs
        # lsm/socket_create: attached once where the kernel runs BPF LSM, else not loaded
        (lsm,) = [p for p in progs if p["optional"]]
        assert lsm["attached"] == int(lsm["pinned"]), lsm
        # attached per namespace, or to the tunnel's cgroup; no control plane here: none
        assert [p["attached"] for p in progs if p["elsewhere"] and not p["optional"]] == [0, 0, 0]

        f3 = wait_for(
            lambda: (f := _flow(src, dst)) and f.bytes_sent > f2.bytes_sent and f,
            10,
            what="bytes counted after the restart",
        )
        assert f3.cookie == f1.cookie

        cli.stdin.close()
        sent = read_json(cli, "sent")["sent"]
        assert read_json(srv, "received")["received"] == sent

        def closed_record():
            try:
                with open(os.path.join(state, "closed.jsonl")) as f:
                    recs = [json.loads(line) for line in f]
            except OSError:
                return None
            return next((x for x in recs if x["cookie"] == f1.cookie), None)

        rec = wait_for(closed_record, 10, what="the closed flow in the agent's records")
        assert rec["bytes_sent"] == sent  # exact, across the restart
        assert rec["close"] == "fin"
        assert os.stat(os.path.join(state, "closed.jsonl")).st_mode & 0o777 == 0o640
        a2.send_signal(signal.SIGTERM)
        assert a2.wait(10) == 0
    finally:
        src.close()
