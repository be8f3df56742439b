"""`dabba install systemd` / `dabba uninstall systemd`: the host install path.

Three units, each ``Type=notify`` with a watchdog, restarted on failure:

- ``dabba-control.service``: the control plane (CA, registry, distribution).
  It runs as root with no capabilities at all.
- ``dabba-agent.service``: the node agent. It loads and pins the eBPF
  programs and follows the control plane. It holds only CAP_BPF,
  CAP_NET_ADMIN, CAP_SYS_ADMIN (iterating programs, attaching to network
  namespaces) and CAP_PERFMON.
- ``dabba-tunnel.service``: the node tunnel, as its own service and not the
  agent's child, so ``systemctl restart dabba-agent`` touches no connection.
  Stopping the agent leaves the pinned programs and the tunnel working.

and a template, written with the node's units, enabled by the operator per waypoint whose pod
this host runs: ``systemctl enable --now "dabba-waypoint@$(systemd-escape NAMESPACE/NAME)"``
(``dabba waypoint run``: upstream Envoy, configured by the control plane).

The unit texts live here, rendered with the path of the ``dabba`` that runs
them; ``deploy/systemd/`` holds them rendered for ``/opt/dabba/bin/dabba``
(``make gen`` writes them, ``make gen-check`` fails when they are stale).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass

import yaml

from . import log
from .errors import DabbaError

_log = log.get("install")

DEFAULT_BIN = "/opt/dabba/bin/dabba"
CONFIG_DIR = "/etc/dabba"
STATE_DIR = "/var/lib/dabba"
UNIT_DIR = "/etc/systemd/system"
UNITS = ("dabba-control.service", "dabba-agent.service", "dabba-tunnel.service")
NODE_UNITS = ("dabba-agent.service", "dabba-tunnel.service")
WAYPOINT_TEMPLATE = "dabba-waypoint@.service"
TOKEN_CREDENTIAL = "join-token"

_COMMON_HARDENING = """\
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectKernelLogs=yes
ProtectClock=yes
ProtectHostname=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
SystemCallArchitectures=native
"""


def control_unit(binary: str) -> str:
    return f"""\
# dabbawala control plane: CA, registry of workloads/services/policies, distribution to nodes.
# Installed by `dabba install systemd --role control`; flags go in {CONFIG_DIR}/control.env.
[Unit]
Description=dabbawala control plane (CA, registry, gRPC distribution to node agents)
Documentation=man:dabba(1) https://github.com/dabbawala/dabbawala#install
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
Environment=DABBA_CONTROL_ARGS=
EnvironmentFile=-{CONFIG_DIR}/control.env
ExecStart={binary} control serve --state-dir {STATE_DIR}/control --registry {CONFIG_DIR}/registry $DABBA_CONTROL_ARGS
Restart=on-failure
RestartSec=2s
WatchdogSec=30s
TimeoutStartSec=60s
TimeoutStopSec=20s
StateDirectory=dabba dabba/control
StateDirectoryMode=0700
ConfigurationDirectory=dabba
# root, but without any capability: it only listens on ports above 1024 and writes its state
CapabilityBoundingSet=
{_COMMON_HARDENING}ProtectKernelModules=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectControlGroups=yes
RestrictNamespaces=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6

[Install]
WantedBy=multi-user.target
"""


def agent_unit(binary: str) -> str:
    return f"""\
# dabbawala node agent: loads and pins the eBPF programs, enrols workloads, joins the control
# plane. Stopping it leaves the programs pinned and attached (traffic flows, accounted, guarded).
[Unit]
Description=dabbawala node agent (eBPF capture, accounting and guard; control plane link)
Documentation=man:dabba(1) https://github.com/dabbawala/dabbawala#install
After=network-online.target
Wants=network-online.target dabba-tunnel.service
ConditionPathExists={CONFIG_DIR}/agent.yaml

[Service]
Type=notify
NotifyAccess=main
ExecStartPre={binary} agent run --config {CONFIG_DIR}/agent.yaml --check
ExecStart={binary} agent run --config {CONFIG_DIR}/agent.yaml
Restart=on-failure
RestartSec=2s
WatchdogSec=30s
# the first start compiles the eBPF programs (bcc, clang): minutes on a small or emulated machine
TimeoutStartSec=600s
TimeoutStopSec=20s
# state_dir (/var/lib/dabba/<node>): the node's identity, which must outlive a reboot, and the
# sockets the tunnel and `dabba` talk to
StateDirectory=dabba
ConfigurationDirectory=dabba
ReadWritePaths=/sys/fs/bpf
# no ProtectKernelModules=: it hides /lib/modules, where bcc finds the kernel headers
LimitMEMLOCK=infinity
CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_SYS_ADMIN CAP_PERFMON
# AF_PACKET: only for the probe that the BPF LSM refuses workloads' packet sockets (family.c
# counts the attempt); without CAP_NET_RAW the agent never gets such a socket itself
{_COMMON_HARDENING}RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_PACKET

[Install]
WantedBy=multi-user.target
"""


def tunnel_unit(binary: str) -> str:
    return f"""\
# dabbawala node tunnel: HBONE over mutual TLS between nodes, L4 policy, same-node splice.
# Its own service so that restarting the agent drops no connection.
[Unit]
Description=dabbawala node tunnel (HBONE over mutual TLS, policy, same-node splice)
Documentation=man:dabba(1) https://github.com/dabbawala/dabbawala#install
After=network-online.target dabba-agent.service
Wants=network-online.target
ConditionPathExists={CONFIG_DIR}/agent.yaml

[Service]
Type=notify
NotifyAccess=main
ExecStart={binary} tunnel run --config {CONFIG_DIR}/agent.yaml
Restart=on-failure
RestartSec=1s
WatchdogSec=30s
# it waits for the agent's pins, which the agent's first start compiles
TimeoutStartSec=600s
# SIGTERM: stop accepting, let open flows go on for tunnel.drain seconds (default 30)
KillMode=mixed
TimeoutStopSec=45s
StateDirectory=dabba
ConfigurationDirectory=dabba
LimitNOFILE=1048576
# SO_MARK (CAP_NET_ADMIN), listeners inside workload namespaces (CAP_SYS_ADMIN), pinned maps
CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_SYS_ADMIN
{_COMMON_HARDENING}ProtectKernelModules=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK

[Install]
WantedBy=multi-user.target
"""


def waypoint_unit(binary: str) -> str:
    return f"""\
# dabbawala waypoint: upstream Envoy serving the L7 of the services that opt in
# (istio.io/use-waypoint), configured by the control plane; the instance is the waypoint's
# NAMESPACE/NAME, escaped: systemctl enable --now "dabba-waypoint@$(systemd-escape default/wp)"
[Unit]
Description=dabbawala waypoint %I (Envoy, configured by the control plane)
Documentation=man:dabba(1) https://github.com/dabbawala/dabbawala#install
After=network-online.target dabba-agent.service
Wants=network-online.target
ConditionPathExists={CONFIG_DIR}/agent.yaml

[Service]
# ready once Envoy runs the control plane's configuration; the watchdog while it is supervised
Type=notify
NotifyAccess=main
ExecStart={binary} waypoint run --waypoint %I --config {CONFIG_DIR}/agent.yaml --workdir /run/dabba-waypoint/%i
Restart=on-failure
RestartSec=2s
WatchdogSec=30s
TimeoutStartSec=120s
RuntimeDirectory=dabba-waypoint/%i
RuntimeDirectoryMode=0700
# it reads its pod's certificate (the agent's state) and binds 15008, 15020, 15021: no capability
CapabilityBoundingSet=
{_COMMON_HARDENING}ProtectKernelModules=yes
ReadOnlyPaths={STATE_DIR}
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
LimitNOFILE=1048576

[Install]
WantedBy=multi-user.target
"""


def token_dropin() -> str:
    return f"""\
# The one-time join token, handed to the agent as a systemd credential
# ($CREDENTIALS_DIRECTORY/{TOKEN_CREDENTIAL}); it is read before control.token_file.
[Service]
LoadCredential={TOKEN_CREDENTIAL}:{CONFIG_DIR}/credentials/{TOKEN_CREDENTIAL}
"""


def units(binary: str = DEFAULT_BIN) -> dict[str, str]:
    return {
        "dabba-control.service": control_unit(binary),
        "dabba-agent.service": agent_unit(binary),
        "dabba-tunnel.service": tunnel_unit(binary),
        WAYPOINT_TEMPLATE: waypoint_unit(binary),
    }


def cgroup2_mount() -> str:
    """Where cgroup v2 is mounted: /sys/fs/cgroup (unified) or /sys/fs/cgroup/unified (hybrid)."""
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f if line.split()[2] == "cgroup2"]
    if not mounts:
        raise DabbaError("no cgroup v2 mount (the agent attaches its programs to a v2 cgroup)")
    return "/sys/fs/cgroup" if "/sys/fs/cgroup" in mounts else mounts[0]


def route_source(host: str) -> str:
    """The local address this host uses to reach host (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 15012))
        except OSError as e:
            raise DabbaError(f"no route to the control plane at {host}: {e.strerror}") from None
        return s.getsockname()[0]


@dataclass
class NodeSettings:
    node: str
    node_address: str
    control_host: str
    cgroup: str
    tunnel_address: str = ""


def agent_config(s: NodeSettings) -> str:
    """A starter /etc/dabba/agent.yaml (every field: agent/node/config.py)."""
    doc = {
        "node": s.node,
        "cgroup": s.cgroup,
        "state_dir": f"{STATE_DIR}/{s.node}",
        "tunnel": {
            "address": s.tunnel_address or s.node_address,
            "port": 15001,
            "run": False,  # dabba-tunnel.service runs it
            "inbound": f"{s.node_address}:15008",
        },
        "capture": {"enabled": True},
        "control": {
            "address": f"{s.control_host}:15012",
            "join_address": f"{s.control_host}:15013",
            "ca_file": f"{CONFIG_DIR}/ca.pem",
            "token_file": f"{CONFIG_DIR}/credentials/{TOKEN_CREDENTIAL}",
            "node_address": s.node_address,
        },
    }
    head = (
        "# dabbawala node agent (and tunnel) config; written by `dabba install systemd`.\n"
        "# Check it with: dabba agent run --config /etc/dabba/agent.yaml --check\n"
        "# cgroup: the cgroup v2 folder that holds this node's workloads (programs attach there).\n"
    )
    return head + yaml.safe_dump(doc, sort_keys=False)


CONTROL_ENV = """\
# Extra flags for `dabba control serve` (see `dabba control serve --help`), for example
# the addresses nodes use to reach this host, which go into its serving certificate:
#   DABBA_CONTROL_ARGS=--server-name 10.0.0.10 --server-name control.example.org
DABBA_CONTROL_ARGS={args}
"""


@dataclass
class Step:
    what: str
    path: str = ""


START_TIMEOUT = 600.0  # s: a first start compiles the eBPF programs (minutes on a slow VM)


class Installer:
    """Writes files under root (/ on a real host; a folder in tests and image builds)."""

    def __init__(self, root: str = "/", dry_run: bool = False, echo=print):
        self.root = root
        self.dry_run = dry_run
        self.echo = echo

    def p(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def write(self, path: str, text: str, mode: int = 0o644, keep: bool = False) -> None:
        full = self.p(path)
        if keep and os.path.exists(full):
            self.echo(f"kept     {path} (exists; --force replaces it)")
            return
        self.echo(f"{'would write' if self.dry_run else 'wrote'}    {path}")
        if self.dry_run:
            return
        os.makedirs(os.path.dirname(full), exist_ok=True)
        tmp = full + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, full)

    def mkdir(self, path: str, mode: int) -> None:
        if not self.dry_run:
            os.makedirs(self.p(path), mode=mode, exist_ok=True)
            os.chmod(self.p(path), mode)

    def remove(self, path: str) -> None:
        full = self.p(path)
        if os.path.lexists(full):
            self.echo(f"{'would remove' if self.dry_run else 'removed'}  {path}")
            if not self.dry_run:
                if os.path.isdir(full) and not os.path.islink(full):
                    shutil.rmtree(full)
                else:
                    os.unlink(full)

    def systemd_running(self) -> bool:
        return self.root == "/" and os.path.isdir("/run/systemd/system")

    def start(self, *units: str, timeout: float = START_TIMEOUT) -> None:
        """Start units and wait until each is active; a unit that fails (and is restarting)
        is an error naming it with the end of its journal, never an endless wait."""
        import time

        self.systemctl("start", "--no-block", *units)
        if self.dry_run:
            return
        deadline = time.monotonic() + timeout
        while True:
            states = {u: self._show(u) for u in units}
            if all(st.get("ActiveState") == "active" for st in states.values()):
                self.echo(f"active   {', '.join(units)}")
                return
            for u, st in states.items():
                if st.get("ActiveState") == "failed" or int(st.get("NRestarts") or 0) > 0:
                    lines = subprocess.run(
                        ["journalctl", "-u", u, "-n", "200", "--no-pager", "-o", "cat"],
                        capture_output=True,
                        text=True,
                    ).stdout.splitlines()
                    # the program's own error and hint, else the journal's last lines
                    said = [x for x in lines if x.startswith(("error:", "hint:"))][-2:]
                    tail = "\n".join(said or lines[-6:])
                    raise DabbaError(
                        f"{u} failed to start ({st.get('Result', '?')}); its journal ends:\n{tail}",
                        hint=f"fix the cause, then `systemctl restart {u}` "
                        f"(`journalctl -u {u} -e` has the rest)",
                    )
            if time.monotonic() > deadline:
                raise DabbaError(
                    f"{', '.join(units)} not active after {timeout:.0f}s",
                    hint="see `systemctl status` and `journalctl -u dabba-agent -e`",
                )
            time.sleep(1)

    def _show(self, unit: str) -> dict[str, str]:
        r = subprocess.run(
            ["systemctl", "show", "-p", "ActiveState", "-p", "NRestarts", "-p", "Result", unit],
            capture_output=True,
            text=True,
        )
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def systemctl(self, *args: str) -> None:
        self.echo(f"{'would run' if self.dry_run else 'running'}  systemctl {' '.join(args)}")
        if self.dry_run:
            return
        r = subprocess.run(["systemctl", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise DabbaError(
                f"systemctl {' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}",
                hint="see `journalctl -u dabba-agent -u dabba-tunnel -u dabba-control -e`",
            )


def install(
    inst: Installer,
    role: str,
    binary: str,
    node: NodeSettings | None = None,
    token: str | None = None,
    ca_pem: str | None = None,
    control_args: str = "",
    force: bool = False,
    start: bool = True,
) -> list[str]:
    """Write units and starter config for role (node, control or all); returns the units."""
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise DabbaError(f"{binary} is not an executable file (the units would run it)")
    want = {"node": NODE_UNITS, "control": ("dabba-control.service",), "all": UNITS}[role]
    rendered = units(binary)
    inst.mkdir(CONFIG_DIR, 0o755)
    inst.mkdir(STATE_DIR, 0o755)
    for u in want:
        inst.write(f"{UNIT_DIR}/{u}", rendered[u])
    if "dabba-control.service" in want:
        inst.mkdir(f"{CONFIG_DIR}/registry", 0o755)
        inst.write(
            f"{CONFIG_DIR}/control.env", CONTROL_ENV.format(args=control_args), keep=not force
        )
    if "dabba-agent.service" in want:
        assert node is not None
        inst.write(f"{UNIT_DIR}/{WAYPOINT_TEMPLATE}", rendered[WAYPOINT_TEMPLATE])
        inst.write(f"{CONFIG_DIR}/agent.yaml", agent_config(node), keep=not force)
        inst.mkdir(f"{CONFIG_DIR}/credentials", 0o700)
        if token:
            inst.write(f"{CONFIG_DIR}/credentials/{TOKEN_CREDENTIAL}", token.strip() + "\n", 0o600)
            inst.write(f"{UNIT_DIR}/dabba-agent.service.d/10-join-token.conf", token_dropin())
        if ca_pem:
            inst.write(f"{CONFIG_DIR}/ca.pem", ca_pem, 0o644)
    if inst.systemd_running():
        inst.systemctl("daemon-reload")
        if start:
            inst.systemctl("enable", *want)
            inst.start(*want)
        else:
            inst.systemctl("enable", *want)
    else:
        inst.echo("systemd is not running here: units written, nothing enabled or started")
    return list(want)


def uninstall(inst: Installer, purge: bool = False) -> None:
    """Stop and remove the units, detach and unpin the node's programs; with purge, config and
    state go too (the CA's private key with them)."""
    present = [u for u in UNITS if os.path.exists(inst.p(f"{UNIT_DIR}/{u}"))]
    pin_name = None
    cfg_path = inst.p(f"{CONFIG_DIR}/agent.yaml")
    if os.path.exists(cfg_path):
        from .node import config as cfgmod

        try:
            pin_name = cfgmod.load(cfg_path).pin_name
        except DabbaError as e:
            inst.echo(f"warning: {e}; pins are left in place (dabba bpf unload --node NAME)")
    if inst.systemd_running() and present:
        inst.systemctl("disable", "--now", *present)
    for u in (*UNITS, WAYPOINT_TEMPLATE):
        inst.remove(f"{UNIT_DIR}/{u}")
    inst.remove(f"{UNIT_DIR}/dabba-agent.service.d")
    if inst.systemd_running() and present:
        inst.systemctl("daemon-reload")
    if pin_name and inst.root == "/":
        from .bpf.loader import Datapath

        inst.echo(f"{'would detach' if inst.dry_run else 'detaching'} and unpin node {pin_name}")
        if not inst.dry_run:
            dp = Datapath(pin_name, "/nonexistent")
            dp.remove()
            with contextlib.suppress(OSError):  # <bpffs>/dabba, once no node is pinned there
                os.rmdir(os.path.dirname(dp.pins.root))
    if purge:
        inst.remove(CONFIG_DIR)
        inst.remove(STATE_DIR)
    else:
        inst.echo(f"kept     {CONFIG_DIR} and {STATE_DIR} (--purge removes them)")


def write_deploy(folder: str = "deploy/systemd") -> None:
    """Render the units for /opt/dabba/bin/dabba into folder (`make gen`)."""
    os.makedirs(folder, exist_ok=True)
    for name, text in units(DEFAULT_BIN).items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    with open(os.path.join(folder, "dabba-agent.service.d-10-join-token.conf"), "w") as f:
        f.write(token_dropin())


if __name__ == "__main__":
    import sys

    write_deploy(*sys.argv[1:])
