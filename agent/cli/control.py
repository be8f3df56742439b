"""dabba control: the control plane (serve, join tokens, nodes, its CA)."""

from __future__ import annotations

import json
import os
import re
import sys

import click

from ..control.store import DAEMON_UMASK
from ..errors import DabbaError
from . import _Group, main

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
@click.option(
    "--zipkin",
    default="",
    help="IP:PORT of a Zipkin collector: waypoints send their requests' spans there (off by default)",
)
@click.option(
    "--otlp",
    default="",
    help="IP:PORT of an OpenTelemetry collector (OTLP over gRPC, W3C traceparent), instead of "
    "--zipkin",
)
@click.option(
    "--trace-sampling",
    type=click.FloatRange(0, 100),
    default=1.0,
    show_default=True,
    help="percent of requests a waypoint traces (Istio's default: 1)",
)
def control_serve(
    health_listen,
    zipkin,
    otlp,
    trace_sampling,
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

    from ..control.server import ControlConfig, serve

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
        zipkin=zipkin,
        otlp=otlp,
        trace_sampling=trace_sampling,
    )
    from ..control import validate

    err = validate.namespace_error(root_namespace)
    if err:
        raise DabbaError(f"--root-namespace: {err}")
    for opt, v in (("--zipkin", zipkin), ("--otlp", otlp)):
        if v and not re.fullmatch(r"\d+\.\d+\.\d+\.\d+:\d{1,5}", v):
            raise DabbaError(f"{opt}: {v!r} is not IPv4:PORT")
    if zipkin and otlp:
        raise DabbaError("--zipkin and --otlp: a waypoint sends its spans to one collector")
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
    from ..control.tokens import TokenStore

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
    from ..control.revocation import RevokedNodes

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
    from ..control.revocation import RevokedNodes

    if not RevokedNodes(state_dir).unrevoke(node):
        raise DabbaError(f"node {node} is not revoked")
    click.echo(f"node {node} is no longer revoked")


@control_node.command("list")
@click.option("--state-dir", default=DEFAULT_CONTROL_STATE, show_default=True)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def control_node_list(state_dir, output):
    """Joined nodes (name, address) and whether each is revoked."""
    from ..control.revocation import RevokedNodes

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
    from ..control.ca import CA

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
    from ..control.ca import fingerprint

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
    from ..control.ca import fingerprint

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
