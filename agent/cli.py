"""The `dabba` command."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys

import click

from . import log
from .control.store import DAEMON_UMASK
from .errors import DabbaError

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
    from .lab import lab as labmod
    from .lab import spec

    _need_root("dabba lab up")
    sp = spec.load_spec(file_, nodes) if file_ else spec.default_spec(nodes or 2, pods_per_node)
    L = labmod.up(name, sp)
    if mesh:
        from .lab import mesh as meshmod

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
    from .lab import lab as labmod

    _need_root("dabba lab exec")
    L = labmod.load(name)
    full, pre = L.command(target, list(cmd))
    import subprocess

    sys.exit(subprocess.call(full, preexec_fn=pre))


@lab.command("ls")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def lab_ls(output):
    """List labs."""
    from .lab import lab as labmod

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
    from .lab import lab as labmod

    _need_root("dabba lab down")
    found = labmod.down(name, quiet=True)
    click.echo(f"lab {name} removed" if found else f"lab {name}: nothing to remove")


# ---- bpf ------------------------------------------------------------------------------------


@main.group(cls=_Group)
def bpf():
    """The eBPF datapath of a node: status, load, unload."""


def _datapath(node, config, cgroup):
    from .bpf.loader import Datapath

    if config:
        from .node import config as cfgmod

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
    from .bpf import sys as bpfsys
    from .bpf.features import cgroup2_root

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
                from .ops import attached_to

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
    from .node import config as cfgmod
    from .node.agent import Agent

    _need_root("dabba bpf load")
    a = Agent(cfgmod.load(config))
    a.start()
    for r in a.load_reports:
        click.echo(f"{r.action:<8} {r.program:<16} {r.seconds:.2f}s")


@bpf.command("unload")
@click.option("--node", required=True, help="node (pin folder) name")
def bpf_unload(node):
    """Detach every program of a node and remove its pins (traffic is no longer captured)."""
    from .bpf.loader import Datapath

    _need_root("dabba bpf unload")
    Datapath(node, "/nonexistent").remove()
    click.echo(f"node {node}: programs detached, pins removed")


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
    from .node import config as cfgmod
    from .node.agent import Agent

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


# ---- control plane ------------------------------------------------------------------------------


def _duration(text: str, what: str):
    import datetime
    import re

    m = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not m:
        raise DabbaError(f"{what}: {text!r} is not a duration like 90s, 30m, 24h or 7d")
    n, unit = int(m.group(1)), m.group(2)
    return datetime.timedelta(seconds=n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])


DEFAULT_CONTROL_STATE = "/var/lib/dabba/control"


@main.group(cls=_Group)
def control():
    """The control plane: CA, registry, distribution to nodes."""


@control.command("serve")
@click.option(
    "--state-dir",
    default=DEFAULT_CONTROL_STATE,
    show_default=True,
    help="CA, tokens, nodes, serials",
)
@click.option(
    "--registry",
    "registry_dir",
    type=click.Path(file_okay=False),
    help="folder of YAML documents (workloads, services, Istio policies); hot-reloaded",
)
@click.option(
    "--source",
    type=click.Choice(["files", "kubernetes"]),
    default="files",
    show_default=True,
    help="where workloads, services and policies come from",
)
@click.option(
    "--kubeconfig", type=click.Path(dir_okay=False), help="with --source kubernetes, outside a pod"
)
@click.option(
    "--join-service-account",
    default="",
    help="NAMESPACE/NAME: nodes may also join with their agent pod's ServiceAccount token, "
    "checked with the API server (Kubernetes node attestation; off by default)",
)
@click.option(
    "--list-interval",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="with --source kubernetes: seconds between lists of the cluster",
)
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option(
    "--root-namespace",
    default="istio-system",
    show_default=True,
    help="policies in this namespace apply mesh-wide (Istio's meshConfig.rootNamespace)",
)
@click.option(
    "--listen", default="0.0.0.0:15012", show_default=True, help="mutual-TLS API for joined nodes"
)
@click.option(
    "--join-listen",
    default="0.0.0.0:15013",
    show_default=True,
    help="TLS port for joining with a token",
)
@click.option(
    "--server-name", "server_names", multiple=True, help="DNS name or IP in the serving certificate"
)
@click.option(
    "--workload-ttl", default="24h", show_default=True, help="lifetime of workload certificates"
)
@click.option("--node-ttl", default="7d", show_default=True, help="lifetime of node certificates")
@click.option(
    "--plugin-ca",
    type=click.Path(file_okay=False),
    help="Istio-style cacerts folder (ca-cert.pem, ...)",
)
@click.option(
    "--health-listen",
    default="",
    help="HOST:PORT for /healthz/ready, /healthz/live, /status and /metrics (off by default)",
)
def control_serve(
    health_listen,
    root_namespace,
    list_interval,
    join_service_account,
    state_dir,
    registry_dir,
    trust_domain,
    listen,
    join_listen,
    server_names,
    workload_ttl,
    plugin_ca,
    source,
    kubeconfig,
    node_ttl,
):
    """Serve the control plane.

    \b
    Example:
      dabba control serve --registry /etc/dabba/registry --server-name 10.10.0.1
    """
    import asyncio
    import signal

    from .control.server import ControlConfig, serve

    os.umask(DAEMON_UMASK)
    cfg = ControlConfig(
        state_dir=state_dir,
        registry_dir=registry_dir,
        trust_domain=trust_domain,
        listen=listen,
        join_listen=join_listen,
        server_names=list(server_names),
        workload_ttl=_duration(workload_ttl, "--workload-ttl"),
        node_ttl=_duration(node_ttl, "--node-ttl"),
        plugin_ca_dir=plugin_ca,
        source=source,
        kubeconfig=kubeconfig,
        health_listen=health_listen,
        root_namespace=root_namespace,
        kube_list_s=list_interval,
        join_service_account=join_service_account,
    )
    from .control import validate

    err = validate.namespace_error(root_namespace)
    if err:
        raise DabbaError(f"--root-namespace: {err}")
    if health_listen and not re.fullmatch(r"[^:]*:\d{1,5}", health_listen):
        raise DabbaError(f"--health-listen: {health_listen!r} is not HOST:PORT")
    if source == "files" and not registry_dir:
        raise DabbaError("--registry DIR is required with --source files")

    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(cfg, stop)

    asyncio.run(run())


@control.group("token", cls=_Group)
def control_token():
    """One-time join tokens for nodes."""


@control_token.command("create")
@click.option("--node", required=True, help="the node that will join with it")
@click.option(
    "--ttl", default="1h", show_default=True, help="how long it stays valid (it works once)"
)
@click.option("--state-dir", default=DEFAULT_CONTROL_STATE, show_default=True)
def control_token_create(node, ttl, state_dir):
    """Print a one-time join token for NODE.

    \b
    Example:
      dabba control token create --node n1 --ttl 1h > /etc/dabba/join-token
    """
    from .control.tokens import TokenStore

    click.echo(TokenStore(state_dir).create(node, _duration(ttl, "--ttl").total_seconds()))


@control.command("status")
@click.option("--state-dir", default=DEFAULT_CONTROL_STATE, show_default=True)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def control_status(state_dir, output):
    """The running control plane's registry source: the version it serves, and while its
    changes or lists fail, why and since when (the last good state stays in force).
    Exits 1 while the source fails."""
    import time

    path = os.path.join(state_dir, "status.json")
    try:
        with open(path) as f:
            st = json.load(f)
    except FileNotFoundError:
        raise DabbaError(
            f"no {path}: is the control plane running with --state-dir {state_dir}?"
        ) from None
    src = st["registry"]
    if output == "json":
        click.echo(json.dumps(st, indent=1))
    else:
        click.echo(
            f"trust domain {st['trust_domain']}, {len(st['nodes'])} node(s), "
            f"{st['certificates_issued']} certificate(s) issued"
        )
        click.echo(
            f"registry    {src['source']}, version {src['version']}: {src['workloads']} "
            f"workload(s), {src['services']} service(s), {src['policies']} polic(y/ies)"
        )
        for w in src["warnings"]:
            click.echo(f"warning: {w}")
        if src["last_error"]:
            since = time.time() - src["failing_since"]
            click.echo(
                f"problem: the registry has been failing for {since:.0f}s ({src['failures']} "
                f"failure(s) since start), serving version {src['version']}: {src['last_error']}"
            )
    sys.exit(1 if src["last_error"] else 0)


@control.group("node", cls=_Group)
def control_node():
    """Joined nodes, and revoking one (it is then refused everywhere)."""


@control_node.command("revoke")
@click.argument("node")
@click.option("--state-dir", default=DEFAULT_CONTROL_STATE, show_default=True)
def control_node_revoke(node, state_dir):
    """Refuse NODE from now on: its RPCs and joins, and on every node's HBONE listener and
    pool the certificates issued to it (told to the nodes within a second or two)."""
    from .control.revocation import RevokedNodes

    if RevokedNodes(state_dir).revoke(node):
        click.echo(
            f"node {node} revoked: the running control plane ends its stream, refuses its "
            "renewals and certificates, and tells every node to refuse its certificates"
        )
    else:
        click.echo(f"node {node} was revoked already")


@control_node.command("unrevoke")
@click.argument("node")
@click.option("--state-dir", default=DEFAULT_CONTROL_STATE, show_default=True)
def control_node_unrevoke(node, state_dir):
    """Lift a revocation (the node joins again with a new token)."""
    from .control.revocation import RevokedNodes

    if not RevokedNodes(state_dir).unrevoke(node):
        raise DabbaError(f"node {node} is not revoked")
    click.echo(f"node {node} is no longer revoked")


@control_node.command("list")
@click.option("--state-dir", default=DEFAULT_CONTROL_STATE, show_default=True)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def control_node_list(state_dir, output):
    """Joined nodes (name, address) and whether each is revoked."""
    from .control.revocation import RevokedNodes

    try:
        with open(os.path.join(state_dir, "nodes.json")) as f:
            nodes = json.load(f)
    except FileNotFoundError:
        nodes = {}
    revoked = RevokedNodes(state_dir).nodes
    rows = [
        {"node": n, "address": nodes.get(n, ""), "revoked": n in revoked}
        for n in sorted(set(nodes) | set(revoked))
    ]
    if output == "json":
        click.echo(json.dumps({"nodes": rows}, indent=1))
        return
    for r in rows:
        click.echo(f"{r['node']:<24}{r['address']:<20}{'REVOKED' if r['revoked'] else ''}")


@control.group("ca", cls=_Group)
def control_ca():
    """The mesh CA: show, rotate the root, retire old roots."""


def _ca(state_dir):
    from .control.ca import CA

    meta = os.path.join(state_dir, "ca", "meta.json")
    if not os.path.exists(meta):
        raise DabbaError(
            f"no CA in {state_dir}", hint="start `dabba control serve --state-dir ...` once first"
        )
    with open(meta) as f:
        td = json.load(f)["trust_domain"]
    return CA.load_or_create(state_dir, td)


@control_ca.command("show")
@click.option("--state-dir", default=DEFAULT_CONTROL_STATE, show_default=True)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def control_ca_show(state_dir, output):
    """The trust bundle's roots and which one signs."""
    from .control.ca import fingerprint

    ca = _ca(state_dir)
    roots = [
        {
            "fingerprint": fingerprint(r),
            "subject": r.subject.rfc4514_string(),
            "not_after": r.not_valid_after_utc.isoformat(),
            "signing": r == ca.signing_root(),
        }
        for r in ca.roots
    ]
    if output == "json":
        click.echo(
            json.dumps({"trust_domain": ca.trust_domain, "mode": ca.mode, "roots": roots}, indent=1)
        )
        return
    click.echo(f"trust domain {ca.trust_domain}  mode {ca.mode}")
    for r in roots:
        click.echo(
            f"  root {r['fingerprint']}  until {r['not_after']}{'  (signing)' if r['signing'] else ''}"
        )
    if ca.next_cert is not None:
        import time

        wait = max(0.0, ca.activate_at - time.time())
        click.echo(f"  rotation in progress: {fingerprint(ca.next_cert)} signs in {wait:.0f}s")


@control_ca.command("rotate")
@click.option("--state-dir", default=DEFAULT_CONTROL_STATE, show_default=True)
@click.option(
    "--overlap",
    default="15s",
    show_default=True,
    help="how long the new root is trusted before it signs",
)
def control_ca_rotate(state_dir, overlap):
    """Start a root rotation with no failed connection, in two phases.

    \b
    1. now: a new root joins the trust bundle; a running control plane sends
       it to every node within a second; the old root still signs;
    2. after --overlap: the new root signs and every node re-issues.
    Then `dabba control ca retire` drops the old root.
    """
    from .control.ca import fingerprint

    root = _ca(state_dir).rotate(_duration(overlap, "--overlap").total_seconds())
    click.echo(
        f"new root {fingerprint(root)} is trusted now and signs in {overlap}; run "
        "`dabba control ca retire` once every node has re-issued its certificates"
    )


@control_ca.command("retire")
@click.option("--state-dir", default=DEFAULT_CONTROL_STATE, show_default=True)
def control_ca_retire(state_dir):
    """Remove every root but the signing one from the trust bundle."""
    gone = _ca(state_dir).retire()
    click.echo(
        f"retired {', '.join(gone)}" if gone else "nothing to retire: the bundle holds one root"
    )


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
    "--eject-after", default=3, show_default=True, help="consecutive connect failures to eject"
)
@click.option("--eject-time", default=30.0, show_default=True, help="base ejection, seconds")
@click.option(
    "--max-ejected", default=0.5, show_default=True, help="most of a service's endpoints ejected"
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

    from .ztunnel.lb import LbConfig
    from .ztunnel.tunnel import Tunnel, TunnelConfig, parse_hostport

    os.umask(DAEMON_UMASK)
    source = source or ""  # "": the outbound listener's address
    source6 = source6 or ""
    if config_path:
        from .node import config as cfgmod

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
        lb=LbConfig(eject_after, eject_time, max_ejected, retries),
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

    from . import systemd
    from .bpf import names

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
            if t["pid"] != old and t["ready"]:
                click.echo(f"tunnel {t['pid']} is ready; {old} hands over and drains")
                return
    raise click.ClickException(
        f"the successor was not ready within {timeout:.0f}s (see tunnel.log)"
    )


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
    from . import ops

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
    from . import ops

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
    from . import ops

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
    from . import ops

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
    from . import ops

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
    from . import ops

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
    from . import ops

    sys.exit(ops.policy_check(ops.client(state_dir, node), src, dst, port, output))


@main.command("config-dump")
@_agent_opts
def config_dump_cmd(state_dir, node):
    """The agent's config, its snapshot and the tunnel's state as JSON (no keys, no tokens).

    \b
    Example:
      dabba config-dump --node demo/n1 | jq .tunnel
    """
    from . import ops

    ops.config_dump(ops.client(state_dir, node))


# ---- demo -----------------------------------------------------------------------------------


@main.command("demo")
@click.option("--name", default="demo", show_default=True)
@click.option("--keep", is_flag=True, help="leave the lab up afterwards")
def demo(name, keep):
    """Build a 2-node lab, load the datapath, move known traffic, show the kernel's flow table."""
    from .demo import run_demo

    _need_root("dabba demo")
    run_demo(name, keep)


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

    from . import install as inst_mod

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
    from . import install as inst_mod

    if root == "/" and not dry_run:
        _need_root("dabba uninstall systemd")
    inst_mod.uninstall(inst_mod.Installer(root, dry_run, click.echo), purge)


if __name__ == "__main__":
    main()
