"""dabba install / uninstall: the systemd units of a node."""

from __future__ import annotations

import os
import shutil
import sys

import click

from ..errors import DabbaError
from . import _Group, _need_root, main

# ---- install ---------------------------------------------------------------------------------


@main.group(cls=_Group)
def install():
    """Install dabbawala on this host (systemd units and a starter config)."""


@install.command("systemd")
@click.option(
    "--role",
    type=click.Choice(["node", "control", "all"]),
    default="node",
    show_default=True,
    help="node: agent + tunnel units; control: the control plane; all: both",
)
@click.option("--control", "control_host", help="address of the control plane (for --role node)")
@click.option("--node-name", help="this node's name [default: the host name]")
@click.option(
    "--node-address", help="where other nodes reach this one [default: the route to --control]"
)
@click.option(
    "--cgroup",
    help="cgroup v2 folder holding the workloads [default: <cgroup2 mount>/kubepods.slice]",
)
@click.option("--token", help="one-time join token (`dabba control token create --node NAME`)")
@click.option("--token-file", type=click.File(), help="read the join token from this file")
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, exists=True),
    help="the control plane's CA bundle",
)
@click.option(
    "--server-name",
    "server_names",
    multiple=True,
    help="for --role control: an address or DNS name nodes use to reach the control plane",
)
@click.option(
    "--bin",
    "binary",
    type=click.Path(dir_okay=False),
    help="the dabba executable the units run [default: this one]",
)
@click.option("--root", default="/", show_default=True, help="install under this folder instead")
@click.option("--force", is_flag=True, help="replace existing config files")
@click.option("--no-start", is_flag=True, help="enable the units but do not start them")
@click.option("--dry-run", is_flag=True, help="print what would be done, change nothing")
def install_systemd(
    role,
    control_host,
    node_name,
    node_address,
    cgroup,
    token,
    token_file,
    ca_file,
    server_names,
    binary,
    root,
    force,
    no_start,
    dry_run,
):
    """Write the systemd units and a starter config, then enable and start them.

    \b
    Example (the control plane host, then each node):
      dabba install systemd --role control --server-name 10.0.0.10
      dabba control token create --node node1      # on the control host
      dabba install systemd --control 10.0.0.10 --token TOKEN --ca-file ca.pem
    """
    import socket as socketmod

    from .. import install as inst_mod

    if root == "/" and not dry_run:
        _need_root("dabba install systemd")
    binary = os.path.abspath(binary or shutil.which("dabba") or sys.argv[0])
    node = None
    ca_pem = None
    if token_file is not None:
        token = token_file.read().strip()
    if role in ("node", "all"):
        if role == "all":
            control_host = control_host or (server_names[0] if server_names else "127.0.0.1")
        if not control_host:
            raise DabbaError("--control HOST is required for --role node")
        address = node_address or inst_mod.route_source(control_host)
        node = inst_mod.NodeSettings(
            node=node_name or socketmod.gethostname().split(".")[0],
            node_address=address,
            control_host=control_host,
            cgroup=cgroup or os.path.join(inst_mod.cgroup2_mount(), "kubepods.slice"),
        )
        if ca_file:
            with open(ca_file) as f:
                ca_pem = f.read()
        elif role == "node":
            click.echo(
                f"note: no --ca-file; copy the control plane's {inst_mod.STATE_DIR}/control/ca/"
                f"bundle.pem to {inst_mod.CONFIG_DIR}/ca.pem before the agent can join"
            )
        if not token and role == "node":
            click.echo(
                f"note: no --token; put one in {inst_mod.CONFIG_DIR}/credentials/join-token "
                "(this node joins once with it)"
            )
    control_args = " ".join(f"--server-name {n}" for n in server_names)
    units = inst_mod.install(
        inst_mod.Installer(root, dry_run, click.echo),
        role,
        binary,
        node=node,
        token=token,
        ca_pem=ca_pem,
        control_args=control_args,
        force=force,
        start=not no_start,
    )
    click.echo(f"\n{', '.join(units)}: installed (running {binary})")
    click.echo("next: systemctl status " + " ".join(units) + "; dabba status")


@main.group(cls=_Group)
def uninstall():
    """Remove what `dabba install` put on this host."""


@uninstall.command("systemd")
@click.option("--root", default="/", show_default=True)
@click.option("--purge", is_flag=True, help="also remove /etc/dabba and /var/lib/dabba (the CA!)")
@click.option("--dry-run", is_flag=True, help="print what would be done, change nothing")
def uninstall_systemd(root, purge, dry_run):
    """Stop and remove the units; detach and unpin the node's programs (capture ends)."""
    from .. import install as inst_mod

    if root == "/" and not dry_run:
        _need_root("dabba uninstall systemd")
    inst_mod.uninstall(inst_mod.Installer(root, dry_run, click.echo), purge)
