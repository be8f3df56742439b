"""The `dabba` command: the root group here, one module per command group (lab.py, bpf.py,
agent.py, control.py, tunnel.py, node.py for the operators' queries, install.py)."""

from __future__ import annotations

import os
import sys

import click

from .. import log
from ..errors import DabbaError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise DabbaError(
            f"{what} needs root (it touches network namespaces, cgroups and BPF objects)",
            hint="run it with sudo",
        )


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DabbaError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            if e.hint:
                click.echo(f"hint: {e.hint}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.option(
    "--log-level", default=None, help="debug, info, warning (default: $DABBA_LOG or info)"
)
def main(log_level):
    """dabbawala: a sidecarless service mesh for Linux nodes.

    \b
    Start here:
      dabba demo                 build a 2-node lab, load the datapath, move traffic, show flows
      dabba lab up --name x      a cluster of network namespaces on this machine
      dabba bpf status --node N  programs, attachments and map fill of a node
    """
    log.setup(log_level)


# the command groups register themselves on main
from . import agent, bpf, control, install, lab, node, tunnel, waypoint  # noqa: E402, F401
