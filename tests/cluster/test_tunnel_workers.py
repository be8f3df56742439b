"""Tunnel workers: several processes on the same ports (SO_REUSEPORT), counted as one tunnel."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from agent.lab import apps
from agent.lab import lab as labmod
from tests.conftest import mesh_lab, tunnel_stats, wait_for, wait_port


@pytest.fixture(scope="module")
def wlab():
    yield from mesh_lab("wk", 2, 2, capture=True, tunnel_workers="2", same_node="tunnel")


def test_two_workers_share_the_load_and_report_as_one(wlab, procs, tmp_path):
    L, _ = wlab
    for node in ("n1", "n2"):
        wait_for(lambda n=node: len(tunnel_stats(L, n)["workers"]) == 2, 30, what=f"{node} workers")
    procs.append(apps.start_nginx(L, "n2-p1", 8080, str(tmp_path / "ng")))
    ip = L.pod("n2-p1").ip
    wait_port(L, "n2-p1", ip, 8080)
    before = tunnel_stats(L, "n1")
    r = L.run(
        "n1-p1", ["wrk", "-t", "2", "-c", "256", "-d", "4s", f"http://{ip}:8080/"], timeout=60
    )
    assert "Socket errors" not in r.stdout and "Non-2xx" not in r.stdout, r.stdout
    time.sleep(1.5)  # workers report once a second
    after = tunnel_stats(L, "n1")
    per = {w["worker"]: w.get("hbone", 0) for w in after["workers"]}
    per0 = {w["worker"]: w.get("hbone", 0) for w in before["workers"]}
    new = {k: per[k] - per0.get(k, 0) for k in per}
    print(f"\n256 connections spread over the workers: {new}")
    # the totals are the workers' sum; wrk opens its 256 (and one to probe the server first)
    assert sum(new.values()) == after["hbone"] - before.get("hbone", 0) in (256, 257)
    assert all(v > 0 for v in new.values()), new  # the kernel spread them over both
    # and every flow is released in every worker once wrk is done
    wait_for(lambda: tunnel_stats(L, "n1")["relayed_sides"] == 0, 15, what="n1 flows released")
    wait_for(lambda: tunnel_stats(L, "n2")["relayed_sides"] == 0, 15, what="n2 flows released")
    pids = {w["pid"] for w in after["workers"]}
    assert len(pids) == 2
    text = L.run("n1", ["curl", "-s", f"http://{L.node('n1').ip}:15020/metrics"]).stdout
    assert re.search(r"^dabba_tunnel_workers 2\.0$", text, re.M)


def test_an_upgrade_with_workers_keeps_spliced_flows(wlab, procs):
    L, _ = wlab
    dst = L.pod("n1-p2")
    srv = L.popen("n1-p2", ["iperf3", "-s", "-1", "-J", "-B", dst.ip, "-p", "5311"],
                  stdout=subprocess.DEVNULL)  # fmt: skip
    procs.append(srv)
    wait_port(L, "n1-p2", dst.ip, 5311)
    clients = []
    cli = L.popen(
        "n1-p1",
        ["iperf3", "-c", dst.ip, "-p", "5311", "-t", "8", "-P", "4", "-J"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    procs.append(cli)
    clients.append(cli)
    time.sleep(2)
    old = {w["pid"] for w in tunnel_stats(L, "n1")["workers"]}
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "tunnel", "upgrade", "--state-dir",
         os.path.join(labmod.STATE_DIR, L.name, "n1")],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for pid in old:  # every old worker handed over and exited while iperf3 still ran
        wait_for(lambda p=pid: not os.path.exists(f"/proc/{p}"), 20, what=f"old worker {pid}")
    assert cli.poll() is None
    out, err = cli.communicate(timeout=30)
    assert cli.returncode == 0, err
    assert "error" not in json.loads(out)
    st = tunnel_stats(L, "n1")
    assert {w["pid"] for w in st["workers"]}.isdisjoint(old)
    assert st.get("adopted", 0) >= 5  # iperf3's control connection and its 4 streams


def test_auto_adds_a_worker_when_the_load_asks(procs, tmp_path, monkeypatch):
    # a low threshold (30% of a core): on 2 shared cores wrk, nginx and both tunnels compete
    monkeypatch.setenv("DABBA_TUNNEL_WORKER_BUSY", "0.3")
    gen = mesh_lab("wa", 2, 1, capture=True, tunnel_workers="auto")
    L, _ = next(gen)
    try:
        assert len(tunnel_stats(L, "n1")["workers"]) == 1
        procs.append(apps.start_nginx(L, "n2-p1", 8080, str(tmp_path / "ng")))
        ip = L.pod("n2-p1").ip
        wait_port(L, "n2-p1", ip, 8080)
        load = L.popen(
            "n1-p1",
            ["wrk", "-t", "2", "-c", "128", "-d", "20s", f"http://{ip}:8080/"],
            stdout=subprocess.DEVNULL,
        )
        procs.append(load)
        wait_for(lambda: len(tunnel_stats(L, "n1")["workers"]) == 2, 25, what="a second worker")
        load.kill()
    finally:
        gen.close()
