"""systemd: the notify protocol, the control plane's readiness and watchdog, the units and
`dabba install systemd` / `dabba uninstall systemd`.

No systemd runs as PID 1 here: `systemd-analyze verify` checks the units
(directives, sections, that ExecStart= runs a real executable), and the test
plays systemd's end of sd_notify with a socket of its own. The units run
under a real systemd in the Vagrant test (`make vagrant-test`).
"""

import asyncio
import os
import socket
import stat
import struct
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from agent import install, systemd
from agent.errors import DabbaError
from agent.node import config as cfgmod

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DABBA = os.path.join(os.path.dirname(sys.executable), "dabba")


def receiver(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    s.bind(path)
    s.settimeout(10)
    return s


def recv(s: socket.socket) -> tuple[int, list[str]]:
    data, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(12))
    pid = next(
        struct.unpack("iII", p[:12])[0]
        for lvl, kind, p in anc
        if lvl == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
    )
    return pid, data.decode().splitlines()


def test_notify_reaches_a_path_and_an_abstract_socket_and_is_a_no_op_outside_systemd(
    tmp_path, monkeypatch
):
    s = receiver(str(tmp_path / "n"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n"))
    assert systemd.notify("READY=1", "STATUS=hello")
    assert recv(s) == (os.getpid(), ["READY=1", "STATUS=hello"])
    name = f"dabba-test-{os.getpid()}"
    a = receiver("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    assert systemd.notify("WATCHDOG=1")
    assert recv(a)[1] == ["WATCHDOG=1"]
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert systemd.notify("READY=1") is False  # a vanished socket is reported, not raised
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize(
    "usec,pid,want",
    [("30000000", None, 15.0), ("30000000", "self", 15.0), ("30000000", "1", None), ("0", None, None),
     ("x", None, None), (None, None, None)],
)  # fmt: skip
def test_watchdog_interval_is_half_of_watchdogsec_and_only_for_the_named_pid(
    monkeypatch, usec, pid, want
):
    for k, v in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, str(os.getpid()) if v == "self" else v)
    assert systemd.watchdog_interval() == want


def test_watchdog_pings_only_while_healthy(tmp_path, monkeypatch):
    s = receiver(str(tmp_path / "n"))
    s.settimeout(0.3)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n"))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    state = {"why": None}

    async def run(seconds):
        t = asyncio.ensure_future(systemd.watchdog(lambda: state["why"]))
        await asyncio.sleep(seconds)
        t.cancel()

    asyncio.run(run(0.3))
    pings = 0
    with pytest.raises(TimeoutError):
        while True:
            assert recv(s)[1] == ["WATCHDOG=1"]
            pings += 1
    assert 3 <= pings <= 8
    state["why"] = "stuck"
    asyncio.run(run(0.3))
    with pytest.raises(TimeoutError):
        recv(s)  # a stuck process sends nothing: systemd restarts it


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_control_plane_is_ready_when_serving_pings_the_watchdog_and_says_it_stops(tmp_path):
    s = receiver(str(tmp_path / "n"))
    (tmp_path / "registry").mkdir()
    api, join, health = _free_ports(3)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "n"), "WATCHDOG_USEC": "1000000"}
    p = subprocess.Popen(
        [
            sys.executable, "-m", "agent.cli", "control", "serve",
            "--state-dir", str(tmp_path / "state"), "--registry", str(tmp_path / "registry"),
            "--listen", f"127.0.0.1:{api}", "--join-listen", f"127.0.0.1:{join}",
            "--health-listen", f"127.0.0.1:{health}",
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        pid, lines = recv(s)
        assert pid == p.pid and lines[0] == "READY=1"
        assert lines[1].startswith(f"STATUS=serving nodes on 127.0.0.1:{api}, joins on")
        # ready means serving: the ports listen and the probe answers
        for port in (api, join):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        for path in ("/healthz/ready", "/healthz/live"):
            with urllib.request.urlopen(f"http://127.0.0.1:{health}{path}", timeout=5) as r:
                assert (r.status, r.read()) == (200, b"ready\n")
        t0 = time.monotonic()
        assert recv(s) == (p.pid, ["WATCHDOG=1"])
        assert recv(s) == (p.pid, ["WATCHDOG=1"])
        assert time.monotonic() - t0 < 3
        p.terminate()
        while (got := recv(s)[1]) == ["WATCHDOG=1"]:
            pass
        assert got == ["STOPPING=1"]
        assert p.wait(15) == 0
    finally:
        p.kill()
        p.wait()


def test_control_plane_health_listen_is_checked(tmp_path):
    (tmp_path / "registry").mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "control", "serve", "--state-dir", str(tmp_path / "s"),
         "--registry", str(tmp_path / "registry"), "--health-listen", "nowhere"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1
    assert "--health-listen: 'nowhere' is not HOST:PORT" in r.stderr


# ---- units and the installer --------------------------------------------------------------


def _install(root, *args):
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "install", "systemd", "--root", str(root), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_units_pass_systemd_analyze_verify_with_no_warning(tmp_path):
    folder = tmp_path / "units"
    folder.mkdir()
    for name, text in install.units(DABBA).items():
        (folder / name).write_text(text)
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(str(p) for p in folder.iterdir())],
        capture_output=True, text=True, cwd=folder,
    )  # fmt: skip
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    # and it does catch what it should: a unit whose binary is missing, a misspelt directive
    bad = folder / "dabba-agent.service"
    bad.write_text(install.agent_unit("/nonexistent/dabba").replace("WatchdogSec=", "WatchDogSec="))
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(bad)], capture_output=True, text=True
    )
    assert r.returncode != 0
    assert "Unknown key 'WatchDogSec'" in r.stderr and "/nonexistent/dabba" in r.stderr


def test_units_say_what_the_issue_asks(tmp_path):
    u = install.units(DABBA)
    for name, text in u.items():
        for line in ("Type=notify", "Restart=on-failure", "WatchdogSec=30s", "NoNewPrivileges=yes",
                     "ProtectSystem=strict", "ProtectHome=yes"):  # fmt: skip
            assert line in text.splitlines(), f"{name}: {line}"
    caps = {
        n: next(x for x in t.splitlines() if x.startswith("CapabilityBoundingSet="))
        for n, t in u.items()
    }
    assert caps == {
        "dabba-control.service": "CapabilityBoundingSet=",
        "dabba-agent.service": "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_SYS_ADMIN "
        "CAP_PERFMON",
        "dabba-tunnel.service": "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_SYS_ADMIN",
        "dabba-waypoint@.service": "CapabilityBoundingSet=",  # Envoy on unprivileged ports
    }
    wp = u["dabba-waypoint@.service"]
    assert (
        f"ExecStart={DABBA} waypoint run --waypoint %I --config /etc/dabba/agent.yaml "
        "--workdir /run/dabba-waypoint/%i" in wp.splitlines()
    )
    # the tunnel is not the agent's child, and the agent does not pull it down when it stops
    agent = u["dabba-agent.service"]
    assert "Wants=network-online.target dabba-tunnel.service" in agent
    assert "BindsTo" not in agent and "PartOf" not in u["dabba-tunnel.service"]
    assert (
        f"ExecStart={DABBA} tunnel run --config /etc/dabba/agent.yaml" in u["dabba-tunnel.service"]
    )
    for name in ("dabba-agent.service", "dabba-tunnel.service"):  # state_dir: /var/lib/dabba/NODE
        assert "StateDirectory=dabba" in u[name].splitlines()
        assert "RuntimeDirectory" not in u[name]  # the identity must outlive a reboot


def test_deploy_systemd_is_the_rendering_for_opt_dabba():
    for name, text in install.units().items():
        with open(os.path.join(ROOT, "deploy", "systemd", name)) as f:
            assert f.read() == text, f"deploy/systemd/{name} is stale: run make gen"


def test_install_writes_units_config_and_token_and_keeps_an_existing_config(tmp_path):
    r = _install(
        tmp_path, "--control", "127.0.0.1", "--node-name", "node7", "--token", "tok-123",
        "--cgroup", "/sys/fs/cgroup/kubepods.slice", "--bin", DABBA,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    etc = tmp_path / "etc"
    for u in ("dabba-agent.service", "dabba-tunnel.service"):
        assert (etc / "systemd/system" / u).read_text() == install.units(DABBA)[u]
        assert f"wrote    /etc/systemd/system/{u}" in r.stdout
    assert not (etc / "systemd/system/dabba-control.service").exists()
    assert "systemd is not running here: units written, nothing enabled or started" in r.stdout
    tok = etc / "dabba/credentials/join-token"
    assert tok.read_text() == "tok-123\n"
    assert stat.S_IMODE(tok.stat().st_mode) == 0o600
    assert stat.S_IMODE((etc / "dabba/credentials").stat().st_mode) == 0o700
    dropin = (etc / "systemd/system/dabba-agent.service.d/10-join-token.conf").read_text()
    assert "LoadCredential=join-token:/etc/dabba/credentials/join-token" in dropin
    cfg = cfgmod.load(str(etc / "dabba/agent.yaml"))  # the starter config is valid
    assert (cfg.node, cfg.cgroup, cfg.tunnel.run) == (
        "node7",
        "/sys/fs/cgroup/kubepods.slice",
        False,
    )
    assert (cfg.control.address, cfg.control.join_address) == ("127.0.0.1:15012", "127.0.0.1:15013")
    assert cfg.control.node_address == "127.0.0.1"  # the route to the control plane
    assert cfg.tunnel.inbound == "127.0.0.1:15008"
    assert cfg.state_dir == "/var/lib/dabba/node7"
    assert "note: no --ca-file" in r.stdout
    # a second install keeps the operator's edited config, and says so
    (etc / "dabba/agent.yaml").write_text((etc / "dabba/agent.yaml").read_text() + "# mine\n")
    r = _install(tmp_path, "--control", "127.0.0.1", "--bin", DABBA)
    assert r.returncode == 0, r.stderr
    assert "kept     /etc/dabba/agent.yaml (exists; --force replaces it)" in r.stdout
    assert (etc / "dabba/agent.yaml").read_text().endswith("# mine\n")


def test_install_control_role_and_dry_run(tmp_path):
    r = _install(tmp_path, "--role", "control", "--server-name", "10.9.0.1", "--dry-run",
                 "--bin", DABBA)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "would write    /etc/systemd/system/dabba-control.service" in r.stdout
    assert not any(tmp_path.iterdir())  # a dry run changes nothing
    r = _install(tmp_path, "--role", "control", "--server-name", "10.9.0.1", "--bin", DABBA)
    assert r.returncode == 0, r.stderr
    env = (tmp_path / "etc/dabba/control.env").read_text()
    assert "\nDABBA_CONTROL_ARGS=--server-name 10.9.0.1\n" in env


def test_install_errors_name_what_is_wrong(tmp_path):
    r = _install(tmp_path, "--bin", DABBA)
    assert r.returncode == 1 and "--control HOST is required for --role node" in r.stderr
    r = _install(tmp_path, "--control", "127.0.0.1", "--bin", str(tmp_path / "nope"))
    assert r.returncode == 1
    assert f"{tmp_path / 'nope'} is not an executable file (the units would run it)" in r.stderr
    assert not (tmp_path / "etc").exists()  # nothing half-written


def test_uninstall_removes_units_and_keeps_config_unless_purged(tmp_path):
    assert _install(tmp_path, "--role", "all", "--token", "t", "--bin", DABBA).returncode == 0
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "uninstall", "systemd", "--root", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not list((tmp_path / "etc/systemd/system").iterdir())
    assert (tmp_path / "etc/dabba/agent.yaml").exists()
    assert "kept     /etc/dabba and /var/lib/dabba (--purge removes them)" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "uninstall", "systemd", "--root", str(tmp_path),
         "--purge"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "etc/dabba").exists() and not (tmp_path / "var/lib/dabba").exists()


def test_installer_refuses_a_missing_binary_before_writing(tmp_path):
    with pytest.raises(DabbaError, match="is not an executable file"):
        install.install(install.Installer(str(tmp_path)), "control", "/nonexistent/dabba")
    assert yaml.safe_load(install.agent_config(install.NodeSettings("n", "10.0.0.2", "10.0.0.1",
                                                                    "/sys/fs/cgroup/x")))  # fmt: skip


def test_dabba_finds_an_installed_agent_in_var_lib_dabba(tmp_path, monkeypatch):
    from agent.node import client

    monkeypatch.setattr(client, "RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(client, "INSTALL_DIR", str(tmp_path / "lib"))
    monkeypatch.setattr(client, "LAB_STATE_DIR", str(tmp_path / "labs"))
    monkeypatch.delenv("DABBA_STATE_DIR", raising=False)
    node = tmp_path / "lib" / "node7"
    node.mkdir(parents=True)
    (node / "agent.sock").touch()
    (tmp_path / "lib" / "control").mkdir()  # the control plane's state: no agent there
    assert client.resolve_state_dir(None, None) == str(node)  # the only agent on the machine
    assert client.resolve_state_dir(None, "node7") == str(node)  # --node NAME
