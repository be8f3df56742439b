"""dabba waypoint: a waypoint's Envoy (run, status); dabba requests: the HTTP requests it saw."""

from __future__ import annotations

import json
import os
import time

import click

from ..errors import DabbaError
from . import _Group, _need_root, main


@main.group(cls=_Group)
def waypoint():
    """Waypoints: L7 (routing, retries, HTTP authorization, request metrics) for the services
    that opt in with the istio.io/use-waypoint label."""


@waypoint.command("run")
@click.option("--name", default=None, help="the waypoint (its Gateway's name)")
@click.option("--namespace", default=None, help="its Gateway's namespace")
@click.option(
    "--waypoint",
    "key",
    default=None,
    help="NAMESPACE/NAME instead of --namespace and --name (dabba-waypoint@.service)",
)
@click.option("--pod", default=None, help="the waypoint's pod on this node (default: --name)")
@click.option(
    "--config",
    "agent_config",
    default=None,
    help="this node's agent configuration (the control plane's address; the pod's certificate "
    "in the agent's state); or the three options below",
)
@click.option("--control", default=None, help="the control plane's gRPC address (HOST:PORT)")
@click.option("--certs", default=None,
              help="the folder with the pod's key.pem and chain.pem, as the node's agent writes "
                   "them (a Kubernetes pod mounts only its own)")  # fmt: skip
@click.option("--ca-file", default=None, help="the trust bundle (PEM)")
@click.option(
    "--workdir",
    default=None,
    help="Envoy's bootstrap, log and local socket (default /run/dabba/waypoints/NS/NAME)",
)
@click.option("--listen", default="0.0.0.0", show_default=True,
              help="address of readiness (15021) and metrics (15020)")  # fmt: skip
def waypoint_run(name, namespace, key, pod, agent_config, control, certs, ca_file, workdir,
                 listen):  # fmt: skip
    """Run one waypoint's Envoy, configured by the control plane over ADS, and supervise it."""
    if key:
        if name or namespace or key.count("/") != 1:
            raise DabbaError("--waypoint is NAMESPACE/NAME, instead of --namespace and --name")
        namespace, name = key.split("/")
    if not name or not namespace:
        raise DabbaError("which waypoint? give --namespace and --name (or --waypoint NS/NAME)")
    _need_root("dabba waypoint run")
    from ..waypoint.run import WaypointConfig, run

    run(WaypointConfig(name, namespace, pod or name, agent_config,
                       workdir or os.path.join("/run/dabba/waypoints", namespace, name), listen,
                       control, certs, ca_file))  # fmt: skip


def _get(url: str) -> dict:
    import urllib.error  # here: every dabba process imports this module (2.7 MiB)
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DabbaError(f"the waypoint at {url} did not answer: {e}",
                         hint="is `dabba waypoint run` running there (metrics port 15020)?") from None  # fmt: skip


@waypoint.command("status")
@click.option("--address", required=True, help="the waypoint pod's address")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
def waypoint_status(address, output):
    """What a waypoint's supervisor says: ready or why not, Envoy restarts, requests seen."""
    doc = _get(f"http://{address}:15020/status")
    if output == "json":
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(
        f"waypoint {doc['waypoint']}: {'ready' if doc['ready'] else 'NOT READY: ' + doc['why']}"
    )
    click.echo(f"  envoy pid {doc['envoy_pid']}, restarted {doc['envoy_restarts']} times, "
               f"{doc['requests_seen']} requests seen; certificate until "
               f"{doc['certificate_not_after']}")  # fmt: skip


def _line(r: dict) -> str:
    t = (
        time.strftime("%H:%M:%S", time.localtime(r["time"]))
        + f".{int(r['time'] * 1000) % 1000:03d}"
    )
    src = r["source"]["workload"] or r["source"]["principal"]
    dst = r["destination"]["workload"] or r["destination"]["service"]
    sub = f" ({r['destination']['subset']})" if r["destination"]["subset"] else ""
    return (f"{t} {src} -> {dst}{sub} {r['method']} {r['authority']}{r['path']} {r['status']} "
            f"{r['duration_ms']:.1f}ms {r['flags']} route={r['route'] or '-'}")  # fmt: skip


@main.command("requests")
@click.option("--waypoint", "address", required=True, help="the waypoint pod's address")
@click.option("--status", "status", type=int, default=None, help="only this response code")
@click.option("--path", "path_prefix", default=None, help="only paths starting so")
@click.option("--source", default=None, help="only from this workload (namespace/name)")
@click.option("--follow", "-f", is_flag=True, help="keep showing new requests")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
def requests_cmd(address, status, path_prefix, source, follow, limit, output):
    """The HTTP requests a waypoint served: source identity, destination, method, path, status,
    duration, response flags and route (like `hubble observe` for HTTP)."""

    def keep(r):
        return ((status is None or r["status"] == status)
                and (path_prefix is None or r["path"].startswith(path_prefix))
                and (source is None or r["source"]["workload"] == source))  # fmt: skip

    seq = 0
    first = True
    while True:
        doc = _get(f"http://{address}:15020/requests?since={seq}")
        rs = [r for r in doc["requests"] if keep(r)]
        if doc["requests"]:
            seq = doc["requests"][-1]["seq"]
        if first:
            rs = rs[-limit:]
            first = False
        for r in rs:
            click.echo(json.dumps(r) if output == "json" else _line(r))
        if not follow:
            return
        time.sleep(1)
