"""dabba bpf: a node's datapath (programs, attachments, map fill), loaded or unloaded."""

from __future__ import annotations

import json
import os
import sys

import click

from ..errors import DabbaError
from . import _Group, _need_root, main

# ---- bpf ------------------------------------------------------------------------------------


@main.group(cls=_Group)
def bpf():
    """The eBPF datapath of a node: status, load, unload."""


def _datapath(node, config, cgroup):
    from ..bpf.loader import Datapath

    if config:
        from ..node import config as cfgmod

        c = cfgmod.load(config)
        return Datapath(c.pin_name, c.cgroup, c.bpffs, c.maps)
    if not node:
        pins = "/sys/fs/bpf/dabba"
        nodes = sorted(os.listdir(pins)) if os.path.isdir(pins) else []
        if len(nodes) != 1:
            raise DabbaError(
                "which node? pass --node NAME or --config FILE",
                hint=f"pinned nodes: {', '.join(nodes) or 'none'}",
            )
        node = nodes[0]
    if not cgroup:
        cgroup = _cgroup_of_pins(node)
    return Datapath(node, cgroup)


def _cgroup_of_pins(node: str) -> str:
    """The cgroup a node's programs are attached to, found from its pinned link."""
    from ..bpf import sys as bpfsys
    from ..bpf.features import cgroup2_root

    link = f"/sys/fs/bpf/dabba/{node}/links/dabba_sockops"
    if not os.path.exists(link):
        return "/nonexistent"
    fd = bpfsys.obj_get(link)
    try:
        cg_id = bpfsys.link_info(fd).cgroup_id
    finally:
        os.close(fd)
    for dirpath, _, _ in os.walk(cgroup2_root()):
        try:
            if os.stat(dirpath).st_ino == cg_id:
                return dirpath
        except OSError:
            continue
    return "/nonexistent"


@bpf.command("status")
@click.option("--node", help="node (pin folder) name; default: the only one pinned")
@click.option(
    "--config", type=click.Path(dir_okay=False), help="agent config to take the node from"
)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def bpf_status(node, config, output):
    """Programs, attachments and map fill of a node.

    Exit code 1 when a program is missing or not attached exactly once.

    \b
    Example:
      dabba bpf status --node demo_n1 -o json
    """
    _need_root("dabba bpf status")
    dp = _datapath(node, config, None)
    if not dp.pins.exists():
        raise DabbaError(
            f"node {dp.node} has no pinned datapath at {dp.pins.root}",
            hint="start the agent (dabba agent run --config FILE) or `dabba bpf load`",
        )
    st = dp.status()
    if output == "json":
        click.echo(json.dumps(st.as_dict(), indent=1))
    else:
        click.echo(f"node {st.node}  pins {st.pin_root}  cgroup {st.cgroup}")
        click.echo(f"\n{'PROGRAM':<16}{'HOOK':<24}{'ID':>6}  {'ATTACHED':<9}TAG")
        for p in st.programs:
            att = {1: "yes", 0: "NO", -1: "unknown"}.get(p.attached, f"{p.attached}x!")
            if p.elsewhere:  # a link per namespace (sk_lookup), the tunnel's cgroup, the LSM
                from ..ops import attached_to

                att = f"{p.attached} {attached_to(p.hook)}"
            tag = p.tag or ("not loaded: the kernel refused it" if p.optional else "not pinned")
            click.echo(f"{p.name:<16}{p.hook:<24}{p.id or '-':>6}  {att:<9}{tag}")
        click.echo(f"\n{'MAP':<17}{'TYPE':<14}{'ENTRIES':>9}{'MAX':>9}{'FILL':>8}")
        for m in st.maps:
            fill = f"{m.fill:.1%}" if m.fill is not None else "-"
            ent = "-" if m.entries is None else m.entries
            click.echo(f"{m.name:<17}{m.type:<14}{ent:>9}{m.max_entries:>9}{fill:>8}")
        if st.counters:
            click.echo("\nCOUNTERS (since load)")
            for k, v in st.counters.items():
                warn = k in ("cap_full", "tuple_full", "flow_full", "ring_drop") and v > 0
                click.echo(f"  {k:<14}{v:>14,}" + ("   <- map pressure" if warn else ""))
    sys.exit(0 if st.healthy() else 1)


@bpf.command("load")
@click.option("--config", type=click.Path(dir_okay=False), required=True, help="agent config")
def bpf_load(config):
    """Load (or adopt) a node's programs and enrol its workloads, then exit."""
    from ..node import config as cfgmod
    from ..node.agent import Agent

    _need_root("dabba bpf load")
    a = Agent(cfgmod.load(config))
    a.start()
    for r in a.load_reports:
        click.echo(f"{r.action:<8} {r.program:<16} {r.seconds:.2f}s")


@bpf.command("unload")
@click.option("--node", required=True, help="node (pin folder) name")
def bpf_unload(node):
    """Detach every program of a node and remove its pins (traffic is no longer captured)."""
    from ..bpf.loader import Datapath

    _need_root("dabba bpf unload")
    Datapath(node, "/nonexistent").remove()
    click.echo(f"node {node}: programs detached, pins removed")
