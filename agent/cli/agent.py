"""dabba agent run: the node agent."""

from __future__ import annotations

import os

import click

from ..control.store import DAEMON_UMASK
from . import _Group, _need_root, main

# ---- agent ------------------------------------------------------------------------------------


@main.group(cls=_Group)
def agent():
    """The node agent."""


@agent.command("run")
@click.option(
    "--config", type=click.Path(dir_okay=False), required=True, help="agent config (YAML)"
)
@click.option(
    "--check", is_flag=True, help="validate the config and the kernel, change nothing, exit"
)
def agent_run(config, check):
    """Run the node agent.

    \b
    Example:
      dabba agent run --config /etc/dabba/agent.yaml --check
    """
    from ..node import config as cfgmod
    from ..node.agent import Agent

    cfg = cfgmod.load(config)
    if check:
        _need_root("dabba agent run --check")
        notes = Agent(cfg).check()
        click.echo(f"{config}: ok")
        for n in notes:
            click.echo(f"  {n}")
        return
    _need_root("dabba agent run")
    os.umask(DAEMON_UMASK)
    a = Agent(cfg)
    a.install_signals()
    a.run()
