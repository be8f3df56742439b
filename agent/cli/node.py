"""The operators' commands that read a node's agent: flows, status, workloads, services,
policies, certs, policy check, config-dump."""

from __future__ import annotations

import sys

import click

from . import _Group, main

# ---- operators' commands: read the agent ----------------------------------------------------


def _agent_opts(fn):
    fn = click.option(
        "--state-dir",
        envvar="DABBA_STATE_DIR",
        type=click.Path(file_okay=False),
        help="the agent's state folder (holds agent.sock); $DABBA_STATE_DIR",
    )(fn)
    return click.option(
        "--node",
        help="the agent of this node: /run/dabba/NODE, or LAB/NODE for a lab's agent "
        "(default: the only agent running here)",
    )(fn)


_OUT = click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")


@main.command("flows")
@_agent_opts
@click.option("--workload", help="either end is this workload (name or namespace/name)")
@click.option("--namespace", help="either end is in this namespace")
@click.option("--service", help="the flow went to this service's VIP (name or namespace/name)")
@click.option("--verdict", help="allow or deny")
@click.option(
    "--path", "path_", help="hbone, splice, direct, passthrough, denied, failed or pending"
)
@click.option("--port", help="destination port")
@click.option("--since", help="only flows open within this long: 30s, 5m, 2h")
@click.option("--state", default="all", show_default=True, help="all, live or closed")
@click.option("--sort", default="start", show_default=True, help="start, bytes, duration or rtt")
@click.option("--limit", help="at most this many flows (the newest, or the top by --sort)")
@click.option("--summary", is_flag=True, help="one row per source/destination workload pair")
@click.option("-f", "--follow", is_flag=True, help="print flows as they open and close")
@click.option("-o", "--output", type=click.Choice(["table", "json", "jsonl"]), default="table")
def flows_cmd(state_dir, node, path_, summary, follow, output, **filters):
    """Live and recently closed flows of this node's workloads.

    One row per workload socket: bytes, segments, retransmits and RTT come from
    the kernel (the same for spliced, HBONE and passthrough flows); identities,
    service, path, security and verdict from the tunnel. →DST is bytes from
    the source to the destination, ←SRC bytes back.

    \b
    Examples:
      dabba flows --node demo/n1
      dabba flows --workload web --verdict deny --since 5m
      dabba flows --summary
      dabba flows --follow -o jsonl
    """
    from .. import ops

    q = {k: v for k, v in filters.items() if v}
    if path_:
        q["path"] = path_
    if q.get("state") == "all":
        q.pop("state")
    if q.get("sort") == "start":
        q.pop("sort")
    ops.flows(ops.client(state_dir, node), q, output, summary, follow)


@main.command("status")
@_agent_opts
@_OUT
def status_cmd(state_dir, node, output):
    """Health of this node: agent, tunnel, programs, control plane, certificates, maps.

    Exit code 1 when something is wrong (each problem is printed).

    \b
    Example:
      dabba status --node demo/n1
    """
    from .. import ops

    sys.exit(ops.status(ops.client(state_dir, node), output))


@main.command("workloads")
@_agent_opts
@click.option(
    "--all", "all_", is_flag=True, help="every workload of the mesh, not only this node's"
)
@_OUT
def workloads_cmd(state_dir, node, all_, output):
    """Workloads this node's agent holds: identity, mTLS mode, enrolment, certificate.

    \b
    Example:
      dabba workloads --node demo/n1 --all
    """
    from .. import ops

    ops.workloads(ops.client(state_dir, node), output, all_)


@main.command("services")
@_agent_opts
@_OUT
def services_cmd(state_dir, node, output):
    """Services (VIPs) with their ports, load-balancing policy and endpoints.

    \b
    Example:
      dabba services -o json
    """
    from .. import ops

    ops.services(ops.client(state_dir, node), output)


@main.command("policies")
@_agent_opts
@_OUT
def policies_cmd(state_dir, node, output):
    """AuthorizationPolicies that apply to this node's workloads, with where each was defined.

    \b
    Example:
      dabba policies -o json
    """
    from .. import ops

    ops.policies(ops.client(state_dir, node), output)


@main.command("certs")
@_agent_opts
@_OUT
def certs_cmd(state_dir, node, output):
    """Every local workload's certificate (identity, serial, issuer, validity) and the roots.

    \b
    Example:
      dabba certs --node demo/n1
    """
    from .. import ops

    ops.certs(ops.client(state_dir, node), output)


@main.group("policy", cls=_Group)
def policy_group():
    """Explain policy decisions."""


@policy_group.command("check")
@_agent_opts
@click.option("--from", "src", required=True, help="source workload (name or namespace/name)")
@click.option("--to", "dst", required=True, help="destination workload on this node")
@click.option("--port", required=True, type=int, help="destination port")
@_OUT
def policy_check_cmd(state_dir, node, src, dst, port, output):
    """The verdict for a connection, and the policy and rule that decide it.

    Computed by the tunnel's own code on the agent's snapshot. Run it on the
    destination's node: that node's tunnel enforces its policies. Exit code
    0 when allowed, 3 when denied, 1 on error.

    \b
    Example:
      dabba policy check --node demo/n2 --from front/web --to back/api --port 8080
    """
    from .. import ops

    sys.exit(ops.policy_check(ops.client(state_dir, node), src, dst, port, output))


@main.command("config-dump")
@_agent_opts
def config_dump_cmd(state_dir, node):
    """The agent's config, its snapshot and the tunnel's state as JSON (no keys, no tokens).

    \b
    Example:
      dabba config-dump --node demo/n1 | jq .tunnel
    """
    from .. import ops

    ops.config_dump(ops.client(state_dir, node))
