"""The control plane says when its registry source fails (and keeps the last good state):
`dabba control status`, /status and /metrics on its health listener, for real on loopback."""

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from agent.control.server import ControlConfig, serve
from tests.unit.test_control_grpc import REG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("timed out")


def _status_cli(state):
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "control", "status", "--state-dir", state],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_a_failing_registry_is_visible_and_the_last_good_state_stays(tmp_path):
    reg = tmp_path / "registry"
    reg.mkdir()
    (reg / "mesh.yaml").write_text(REG)
    health = f"127.0.0.1:{_free_port()}"
    state = str(tmp_path / "state")
    cfg = ControlConfig(
        state_dir=state,
        registry_dir=str(reg),
        listen="127.0.0.1:0",
        join_listen="127.0.0.1:0",
        server_names=["127.0.0.1"],
        registry_poll_s=0.05,
        health_listen=health,
    )
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    t = threading.Thread(target=lambda: loop.run_until_complete(serve(cfg, stop)), daemon=True)
    t.start()
    try:

        def get(path):
            with urllib.request.urlopen(f"http://{health}{path}", timeout=5) as r:
                return r.read().decode()

        st = _wait(lambda: _try(lambda: json.loads(get("/status"))))
        assert st["registry"]["version"] == 1 and st["registry"]["last_error"] is None
        assert st["registry"]["workloads"] == 2 and st["registry"]["policies"] == 2
        r = _wait(lambda: (x := _status_cli(state)).returncode == 0 and x)
        assert "registry    files, version 1: 2 workload(s)" in r.stdout, r.stdout

        (reg / "bad.yaml").write_text("apiVersion: dabbawala.io/v1\nkind: [1]\n")
        st = _wait(lambda: (s := json.loads(get("/status")))["registry"]["last_error"] and s)
        assert "bad.yaml:2: unknown kind [1]" in st["registry"]["last_error"]
        assert st["registry"]["version"] == 1 and st["registry"]["failures"] == 1
        m = get("/metrics")
        assert 'dabba_control_registry_failures_total{source="files"} 1' in m, m
        assert "dabba_control_registry_version 1\n" in m
        assert "dabba_control_registry_failing 1\n" in m
        lint = subprocess.run(
            ["promtool", "check", "metrics"], input=m, capture_output=True, text=True
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr
        r = _wait(lambda: (x := _status_cli(state)).returncode == 1 and x)
        assert "problem: the registry has been failing for" in r.stdout, r.stdout
        assert "serving version 1: " in r.stdout and "unknown kind [1]" in r.stdout

        (reg / "bad.yaml").unlink()
        st = _wait(lambda: (s := json.loads(get("/status")))["registry"]["version"] == 2 and s)
        assert st["registry"]["last_error"] is None
        m = get("/metrics")
        assert "dabba_control_registry_failing 0\n" in m
        assert "dabba_control_registry_stale_seconds 0.0\n" in m
        _wait(lambda: _status_cli(state).returncode == 0)
    finally:
        loop.call_soon_threadsafe(stop.set)
        t.join(10)


def _try(fn):
    try:
        return fn()
    except OSError:
        return None
