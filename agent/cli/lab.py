"""dabba lab (a cluster of network namespaces on this machine) and dabba demo."""

from __future__ import annotations

import json
import sys

import click

from . import _Group, _need_root, main
from .control import _duration

# ---- lab ---------------------------------------------------------------------------------


@main.group(cls=_Group)
def lab():
    """A cluster on one machine: nodes and pods as network namespaces and cgroups."""


@lab.command("up")
@click.option(
    "--name", default="demo", show_default=True, help="unique lab name (1-12 of a-z 0-9 -)"
)
@click.option("--nodes", type=int, default=None, help="number of nodes (default 2, or the file's)")
@click.option("--pods-per-node", type=int, default=2, show_default=True)
@click.option(
    "-f", "--file", "file_", type=click.Path(dir_okay=False), help="cluster YAML: pods, services"
)
@click.option("--mesh", is_flag=True, help="also start a control plane and one agent per node")
@click.option(
    "--capture", is_flag=True, help="with --mesh: agents run their tunnel and capture pod traffic"
)
@click.option(
    "--workload-ttl",
    default="24h",
    show_default=True,
    help="with --mesh: workload certificate lifetime",
)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def lab_up(name, nodes, pods_per_node, file_, mesh, capture, workload_ttl, output):
    """Create a lab and print its nodes and pods.

    \b
    Example:
      dabba lab up --name dev --nodes 2 --pods-per-node 3
      dabba lab up --name dev -f cluster.yaml
    """
    from ..lab import lab as labmod
    from ..lab import spec

    _need_root("dabba lab up")
    sp = spec.load_spec(file_, nodes) if file_ else spec.default_spec(nodes or 2, pods_per_node)
    L = labmod.up(name, sp)
    if mesh:
        from ..lab import mesh as meshmod

        _duration(workload_ttl, "--workload-ttl")
        try:
            meshmod.up(L, workload_ttl, capture=capture)
        except BaseException:
            labmod.down(name, quiet=True)
            raise
    _print_lab(L, output)
    if mesh and output == "table":
        p = meshmod.paths(L)
        click.echo(
            f"\ncontrol plane {labmod.CONTROL_IP}:{meshmod.CONTROL_PORT} (registry {p['registry']}, "
            f"logs {p['logs']}); one agent per node, joined, certificates issued"
        )


def _print_lab(L, output):
    if output == "json":
        click.echo(json.dumps(L.as_dict(), indent=1))
        return
    click.echo(f"lab {L.name}: {len(L.nodes)} nodes, {len(L.pods)} pods (netns {L.netns}.*)")
    click.echo(f"{'NODE':<8}{'ADDRESS':<16}{'POD CIDR':<16}{'TUNNEL':<14}PINS")
    for n in L.nodes:
        click.echo(
            f"{n.name:<8}{n.ip:<16}{n.pod_cidr:<16}{n.gateway:<14}/sys/fs/bpf/dabba/{n.bpf_node}"
        )
    click.echo(f"\n{'POD':<20}{'NODE':<8}{'IP':<14}{'IPV6':<16}{'NAMESPACE':<12}SERVICE ACCOUNT")
    for p in L.pods:
        click.echo(
            f"{p.name:<20}{p.node:<8}{p.ip:<14}{p.ip6 or '-':<16}{p.namespace:<12}"
            f"{p.service_account}"
        )


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("target")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED, required=True)
def lab_exec(name, target, cmd):
    """Run CMD inside a pod (its netns and cgroup) or on a node.

    \b
    Example:
      dabba lab exec dev n1-p1 -- curl -s http://10.20.2.11:8080/
    """
    from ..lab import lab as labmod

    _need_root("dabba lab exec")
    L = labmod.load(name)
    full, pre = L.command(target, list(cmd))
    import subprocess

    sys.exit(subprocess.call(full, preexec_fn=pre))


@lab.command("ls")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def lab_ls(output):
    """List labs."""
    from ..lab import lab as labmod

    labs = labmod.ls()
    if output == "json":
        click.echo(json.dumps([x.as_dict() for x in labs], indent=1))
        return
    if not labs:
        click.echo("no labs (create one with `dabba lab up`)")
    for x in labs:
        click.echo(f"{x.name:<14}{len(x.nodes)} nodes  {len(x.pods)} pods")


@lab.command("down")
@click.argument("name")
def lab_down(name):
    """Remove a lab: processes, pins, namespaces, cgroups. Safe to run twice."""
    from ..lab import lab as labmod

    _need_root("dabba lab down")
    found = labmod.down(name, quiet=True)
    click.echo(f"lab {name} removed" if found else f"lab {name}: nothing to remove")


# ---- demo -----------------------------------------------------------------------------------


@main.command("demo")
@click.option("--name", default="demo", show_default=True)
@click.option("--keep", is_flag=True, help="leave the lab up afterwards")
def demo(name, keep):
    """Build a 2-node lab, load the datapath, move known traffic, show the kernel's flow table."""
    from ..demo import run_demo

    _need_root("dabba demo")
    run_demo(name, keep)
