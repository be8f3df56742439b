"""dabba tunnel: the node tunnel (run, upgrade)."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import click

from .. import log
from ..control.store import DAEMON_UMASK
from ..errors import DabbaError
from . import _Group, _need_root, main

# ---- tunnel ---------------------------------------------------------------------------------------


@main.group(cls=_Group)
def tunnel():
    """The node tunnel (started and supervised by the agent)."""


def _check_source(source: str, version: int = 4) -> None:
    """The tunnel's source address must be an address of this node (its namespace), of IP
    version 4 (--source) or 6 (--source6)."""
    import ipaddress
    import socket

    try:
        ok = ipaddress.ip_address(source).version == version
    except ValueError:
        ok = False
    if not ok:
        raise DabbaError(f"tunnel source {source!r} is not an IPv{version} address") from None
    with socket.socket(socket.AF_INET6 if version == 6 else socket.AF_INET) as s:
        try:
            s.bind((source, 0))
        except OSError as e:
            raise DabbaError(
                f"tunnel source {source}: {e.strerror}",
                hint="it must be an address of this node: the first of the config's "
                "tunnel_addresses, or --source",
            ) from None


@tunnel.command("run")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="take node, state folder, maps, addresses, drain and workers from the agent's config "
    "(the tunnel as its own service); flags given as well win",
)
@click.option("--node")
@click.option("--state-dir", help="the agent's state folder (snapshot.pb, certs/)")
@click.option("--maps", "maps_dir", help="the node's pinned maps folder")
@click.option("--outbound", help="IP:PORT where captured connections arrive (15001)")
@click.option(
    "--outbound6",
    help="[IPv6]:PORT where captured native IPv6 connections arrive (default: none, or the "
    "config's tunnel.address6)",
)
@click.option("--inbound", help="IP:PORT for HBONE (15008)")
@click.option("--registry-only", is_flag=True, help="refuse destinations outside the mesh")
@click.option(
    "--drain",
    default=None,
    type=click.FloatRange(0, 3600),
    help="on SIGTERM, seconds open flows may go on (spliced ones go to a successor at once) "
    "[default: 30, or the config's tunnel.drain]",
)
@click.option("--connect-timeout", default=5.0, show_default=True, help="seconds per endpoint")
@click.option(
    "--eject-after",
    type=int,
    help="consecutive connect failures to eject (default: the config's services.eject_after, 3)",
)
@click.option(
    "--eject-time",
    type=float,
    help="base ejection, seconds (default: the config's services.eject_time, 30)",
)
@click.option(
    "--max-ejected",
    type=float,
    help="most of a service's endpoints ejected (default: the config's services.max_ejected, 0.5)",
)
@click.option(
    "--retries", default=2, show_default=True, help="other endpoints tried after a failed connect"
)
@click.option(
    "--policy-recheck/--no-policy-recheck",
    default=True,
    show_default=True,
    help="on a policy change, also close established flows the new policy denies",
)
@click.option(
    "--loop",
    "loop_kind",
    type=click.Choice(["uvloop", "asyncio"]),
    default="uvloop",
    show_default=True,
    help="event loop: uvloop (libuv) or the standard library's",
)
@click.option(
    "--workers",
    default=None,
    help="processes sharing the listening sockets: a number, or 'auto' to add one per busy core "
    "[default: 1, or the config's tunnel.workers]",
)
@click.option(
    "--source",
    default=None,
    help="source address of connections to this node's workloads: one the ingress guard and "
    "plaintext steering know as the tunnel's [default: the config's first tunnel_addresses, "
    "else the --outbound address]",
)
@click.option(
    "--source6",
    default=None,
    help="IPv6 source address of IPv6 connections to this node's workloads [default: the "
    "config's first IPv6 tunnel_addresses, else the --outbound6 address]",
)
@click.option("--worker", default=0, hidden=True, type=int)
def tunnel_run(
    config_path,
    source,
    source6,
    outbound6,
    workers,
    worker,
    loop_kind,
    policy_recheck,
    node,
    state_dir,
    maps_dir,
    outbound,
    inbound,
    registry_only,
    drain,
    connect_timeout,
    eject_after,
    eject_time,
    max_ejected,
    retries,
):
    """Run the tunnel in the foreground.

    \b
    Example (what dabba-tunnel.service runs):
      dabba tunnel run --config /etc/dabba/agent.yaml
    """
    import asyncio
    import signal

    from ..ztunnel.lb import LbConfig
    from ..ztunnel.tunnel import Tunnel, TunnelConfig, parse_hostport

    os.umask(DAEMON_UMASK)
    source = source or ""  # "": the outbound listener's address
    source6 = source6 or ""
    if config_path:
        from ..node import config as cfgmod

        ac = cfgmod.load(config_path)
        if not ac.tunnel.inbound and ac.control is None:
            raise DabbaError(
                f"{config_path}: the tunnel needs tunnel.inbound or control.node_address "
                "(where other nodes reach its HBONE listener)"
            )
        node = node or ac.node
        state_dir = state_dir or ac.state_dir
        maps_dir = maps_dir or os.path.join(ac.bpffs, "dabba", ac.pin_name, "maps")
        outbound = outbound or f"{ac.tunnel.address}:{ac.tunnel.port}"
        inbound = inbound or ac.tunnel.inbound or f"{ac.control.node_address}:15008"
        drain = ac.tunnel.drain if drain is None else drain
        # the same outlier ejection as the kernel's, for the VIPs the tunnel resolves
        eject_after = ac.services.eject_after if eject_after is None else eject_after
        eject_time = ac.services.eject_time if eject_time is None else eject_time
        max_ejected = ac.services.max_ejected if max_ejected is None else max_ejected
        workers = workers or ac.tunnel.workers
        source = source or ac.tunnel_source(4)
        if ac.tunnel.address6:
            outbound6 = outbound6 or f"[{ac.tunnel.address6}]:{ac.tunnel.port}"
            source6 = source6 or ac.tunnel_source(6)
    missing = [
        f
        for f, v in (
            ("--node", node),
            ("--state-dir", state_dir),
            ("--maps", maps_dir),
            ("--outbound", outbound),
            ("--inbound", inbound),
        )
        if not v
    ]
    if missing:
        raise DabbaError(f"dabba tunnel run needs {', '.join(missing)} (or --config FILE)")
    drain = 30.0 if drain is None else drain
    workers = workers or "1"
    if source:
        _check_source(source)
    if source6:
        _check_source(source6, 6)

    cfg = TunnelConfig(
        node=node,
        state_dir=state_dir,
        maps_dir=maps_dir,
        outbound=parse_hostport(outbound),
        outbound6=parse_hostport(outbound6, 6) if outbound6 else None,
        inbound=parse_hostport(inbound),
        registry_only=registry_only,
        drain=drain,
        connect_timeout=connect_timeout,
        policy_recheck=policy_recheck,
        workers=_workers(workers),
        worker=worker,
        argv=[a for a in sys.argv[1:] if a != "--worker"] if worker == 0 else [],
        lb=LbConfig(
            3 if eject_after is None else eject_after,
            30.0 if eject_time is None else eject_time,
            0.5 if max_ejected is None else max_ejected,
            retries,
        ),
        source=source,
        source6=source6,
    )

    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if await _wait_for_pins(maps_dir, stop):
            await Tunnel(cfg).run(stop)

    if loop_kind == "uvloop":
        import uvloop

        uvloop.run(run())
    else:
        asyncio.run(run())


async def _wait_for_pins(maps_dir: str, stop) -> bool:
    """As its own service the tunnel may start before the agent has pinned the datapath: wait
    (saying so every 10 s) rather than fail; False when stopped meanwhile."""
    import asyncio

    from .. import systemd
    from ..bpf import names

    probe = os.path.join(maps_dir, names.MAP_CAP_TUPLE)
    waited = 0.0
    while not os.path.exists(probe):
        if waited % 10 == 0:
            log.get("tunnel").info(
                "waiting for the agent to pin the datapath", fields={"maps": maps_dir}
            )
            # alive, not ready: systemd may arm the watchdog before READY=1
            systemd.notify(f"STATUS=waiting for the agent to pin the datapath in {maps_dir}")
            if systemd.watchdog_interval() is not None:
                systemd.notify("WATCHDOG=1")
        if stop.is_set():
            return False
        await asyncio.sleep(0.5)
        waited += 0.5
    return True


def _workers(text: str) -> int:
    if text == "auto":
        return 0
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 1 <= n <= 64:
        raise click.BadParameter(
            f"{text!r}: a number from 1 to 64, or 'auto'", param_hint="--workers"
        )
    return n


@tunnel.command("upgrade")
@click.option("--state-dir", required=True, help="the agent's state folder (status.json)")
@click.option(
    "--timeout", default=60.0, show_default=True, help="seconds to wait for the successor"
)
def tunnel_upgrade(state_dir, timeout):
    """Replace the running tunnel without dropping spliced connections.

    The agent starts a successor, which borrows the old tunnel's listening sockets
    (never a second socket on the tunnel's ports); once it is ready the old tunnel hands it every spliced connection (SCM_RIGHTS) and
    drains the rest.

    Example: dabba tunnel upgrade --state-dir /run/dabba/labs/demo/n1
    """
    import signal
    import time

    _need_root("dabba tunnel upgrade")
    path = os.path.join(state_dir, "status.json")
    try:
        with open(path) as f:
            st = json.load(f)
        pid, old = st["pid"], st["tunnel"]["pid"]
        done = st["tunnel"].get("upgrades", 0)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise click.ClickException(f"no running agent found through {path}: {e}") from None
    if b"agent" not in cmd or b"run" not in cmd or not st["tunnel"].get("supervised"):
        raise click.ClickException(f"pid {pid} from {path} is not an agent supervising a tunnel")
    os.kill(pid, signal.SIGHUP)
    click.echo(f"asked agent {pid} to upgrade tunnel {old}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                t = json.load(f)["tunnel"]
            # the agent counts an upgrade once its successor is ready and the old tunnel was
            # told to hand over: a new pid alone is a successor that may still fail and be
            # replaced by the old one
            if t.get("upgrades", 0) > done and t["pid"] != old:
                click.echo(f"tunnel {t['pid']} is ready; {old} hands over and drains")
                return
    raise click.ClickException(
        f"the successor was not ready within {timeout:.0f}s (see tunnel.log)"
    )
