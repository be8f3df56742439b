"""`dabba lab up --mesh`: a control plane and one agent per node, on a lab.

The control plane runs in the lab's own namespace (10.10.0.1:15012, join on
:15013) with a registry generated from the lab's pods and services; every
node gets a one-time join token and an agent (in the node's namespace and
system cgroup) that joins with it. Until the tunnel exists the agents
account and guard but do not capture (capture.enabled: false).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import yaml

from ..errors import DabbaError
from .lab import CONTROL_IP, STATE_DIR, Lab, agent_config

CONTROL_PORT, JOIN_PORT = 15012, 15013
KUBE_API_PORT = 16443  # the API-server stand-in of the lab's Kubernetes mode (lab namespace)


def paths(lab: Lab) -> dict[str, str]:
    root = os.path.join(STATE_DIR, lab.name)
    return {
        "root": root,
        "registry": os.path.join(root, "registry"),
        "control": os.path.join(root, "control"),
        "logs": os.path.join(root, "logs"),
        "kube": os.path.join(root, "kube"),  # objects.json, kubeconfig (Kubernetes mode)
    }


def kube_objects(lab: Lab) -> dict:
    """The lab's pods as the API server lists them (Running, by UID, on their node), no
    Istio objects: what the stand-in serves at first in the lab's Kubernetes mode."""
    pods = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": p.name,
                "namespace": p.namespace,
                "uid": p.uid,
                "labels": p.labels,
            },
            "spec": {
                "nodeName": p.node,
                "serviceAccountName": p.service_account,
                "containers": [{"name": "app", "image": "lab"}],
            },
            "status": {
                "phase": "Running",
                "podIP": p.ip,
                "podIPs": [{"ip": p.ip}, {"ip": p.ip6}],
            },
        }
        for p in lab.pods
    ]
    return {"pods": pods, "services": [], "endpointslices": [], "authorizationpolicies": [],
            "peerauthentications": []}  # fmt: skip


def write_kube_objects(lab: Lab, objects: dict) -> None:
    """Change what the stand-in serves (it reads the file again on its next request)."""
    path = os.path.join(paths(lab)["kube"], "objects.json")
    with open(path + ".tmp", "w") as f:
        json.dump(objects, f)
    os.replace(path + ".tmp", path)


def start_kube_api(lab: Lab) -> subprocess.Popen:
    """The API-server stand-in (agent/lab/kubeapi.py) in the lab's namespace."""
    p = paths(lab)
    proc = _spawn(
        lab,
        "lab",
        [
            sys.executable,
            "-m",
            "agent.lab.kubeapi",
            "--listen",
            f"{CONTROL_IP}:{KUBE_API_PORT}",
            "--objects",
            os.path.join(p["kube"], "objects.json"),
        ],  # fmt: skip
        os.path.join(p["logs"], "kubeapi.log"),
    )
    _wait(lambda: _listening(lab, KUBE_API_PORT), 30, "the Kubernetes API stand-in", proc)
    return proc


def registry_docs(lab: Lab) -> list[dict]:
    docs = []
    for p in lab.pods:
        docs.append(
            {
                "apiVersion": "dabbawala.io/v1",
                "kind": "Workload",
                "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
                "spec": {
                    "serviceAccount": p.service_account,
                    "node": p.node,
                    "ip": p.ip,
                    "ip6": p.ip6,
                    "cgroup": p.cgroup,
                    "netns": f"/run/netns/{p.netns}",
                },
            }
        )
    for s in lab.services:
        docs.append(
            {
                "apiVersion": "dabbawala.io/v1",
                "kind": "Service",
                "metadata": {
                    "name": s["name"],
                    "namespace": s["namespace"],
                    "labels": s.get("labels") or {},
                },
                "spec": {
                    "vip": s["vip"],
                    "selector": s["selector"],
                    "lbPolicy": s["lb_policy"],
                    "ports": [
                        {"port": x["port"], "targetPort": x["target_port"]} for x in s["ports"]
                    ],
                },
            }
        )
    for w in lab.waypoints:
        docs.append(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": w["name"], "namespace": w["namespace"]},
                "spec": {"gatewayClassName": "istio-waypoint"},
            }
        )
    return docs


def _spawn(
    lab: Lab, target: str, argv: list[str], log_path: str, env: dict | None = None
) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 (handed to the child for its life)
    proc = lab.popen(
        target,
        argv,
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **env} if env else None,
    )
    proc.log_path = log_path
    return proc


def start_control(
    lab: Lab,
    workload_ttl: str = "24h",
    node_ttl: str = "7d",
    source: str = "files",
    extra: tuple[str, ...] = (),
) -> subprocess.Popen:
    """source "files": a registry folder made from the lab; "kubernetes": the stand-in's
    objects (start_kube_api), read through the real client every second."""
    from .kubeapi import kubeconfig_for

    p = paths(lab)
    for d in (p["registry"], p["control"], p["logs"], p["kube"]):
        os.makedirs(d, exist_ok=True)
    if source == "kubernetes":
        kubeconfig = kubeconfig_for(
            f"http://{CONTROL_IP}:{KUBE_API_PORT}", os.path.join(p["kube"], "kubeconfig")
        )
        src = ["--source", "kubernetes", "--kubeconfig", kubeconfig, "--list-interval", "1"]
    else:
        with open(os.path.join(p["registry"], "lab.yaml"), "w") as f:
            yaml.safe_dump_all(registry_docs(lab), f, sort_keys=False)
        src = ["--registry", p["registry"]]
    proc = _spawn(
        lab,
        "lab",
        [
            sys.executable,
            "-m",
            "agent.cli",
            "control",
            "serve",
            "--state-dir",
            p["control"],
            *src,
            "--listen",
            f"{CONTROL_IP}:{CONTROL_PORT}",
            "--join-listen",
            f"{CONTROL_IP}:{JOIN_PORT}",
            "--server-name",
            CONTROL_IP,
            "--workload-ttl",
            workload_ttl,
            "--node-ttl",
            node_ttl,
            *extra,
        ],
        os.path.join(p["logs"], "control.log"),
    )
    bundle = os.path.join(p["control"], "ca", "bundle.pem")
    _wait(
        lambda: os.path.exists(bundle) and _listening(lab, CONTROL_PORT),
        30,
        "the control plane",
        proc,
    )
    return proc


def _listening(lab: Lab, port: int) -> bool:
    r = lab.run("lab", ["ss", "-Hltn", f"src {CONTROL_IP}:{port}"], check=False)
    return r.returncode == 0 and r.stdout.strip() != ""


def node_config(
    lab: Lab,
    node: str,
    capture: bool = False,
    tunnel_workers="1",
    tunnel_service=False,
    host_addresses=False,
    max_connections: int | None = None,
    same_node: str = "direct",
) -> str:
    """Write node's join token and agent config; returns the config path.

    host_addresses: the tunnel on the node's own address, as `dabba install systemd` sets up a
    host, not on the pods' gateway: its connections to pods then leave from another address
    than the route would choose, which the guard and the plaintext steering must accept."""
    from ..control.tokens import TokenStore

    p = paths(lab)
    cfg = agent_config(lab, node)
    cfg[
        "workloads"
    ] = []  # the control plane says which workloads exist; cgroups come from the registry
    cfg["capture"]["enabled"] = capture
    if max_connections is not None:  # per workload (the default: a quarter of the map)
        cfg["capture"]["max_connections"] = max_connections
    cfg["capture"]["same_node"] = same_node  # direct (the kernel decides) or tunnel
    if capture:  # capture needs a tunnel: the agent runs one, or it is a service of its own
        cfg["tunnel"]["run"] = not tunnel_service
        cfg["tunnel"]["inbound"] = f"{lab.node(node).ip}:15008"
        cfg["tunnel"]["workers"] = (
            tunnel_workers if tunnel_workers == "auto" else int(tunnel_workers)
        )
    if host_addresses:
        n = lab.node(node)
        cfg["tunnel"]["address"], cfg["tunnel"]["address6"] = n.ip, n.ip6
        cfg["tunnel_addresses"] = [n.ip, n.ip6]
    token = os.path.join(p["root"], f"{node}.token")
    with open(token, "w") as f:
        f.write(TokenStore(p["control"]).create(node, 3600) + "\n")
    os.chmod(token, 0o600)
    cfg["control"] = {
        "address": f"{CONTROL_IP}:{CONTROL_PORT}",
        "join_address": f"{CONTROL_IP}:{JOIN_PORT}",
        "ca_file": os.path.join(p["control"], "ca", "bundle.pem"),
        "token_file": token,
        "node_address": lab.node(node).ip,
    }
    path = os.path.join(p["root"], f"{node}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def start_agent(lab: Lab, node: str, config_path: str, env: dict | None = None) -> subprocess.Popen:
    return _spawn(
        lab,
        node,
        [sys.executable, "-m", "agent.cli", "agent", "run", "--config", config_path],
        os.path.join(paths(lab)["logs"], f"agent-{node}.log"),
        env,
    )


def start_tunnel(
    lab: Lab, node: str, config_path: str, env: dict | None = None
) -> subprocess.Popen:
    """The tunnel as its own process, as dabba-tunnel.service runs it (not the agent's child)."""
    return _spawn(
        lab,
        node,
        [sys.executable, "-m", "agent.cli", "tunnel", "run", "--config", config_path],
        os.path.join(paths(lab)["logs"], f"tunnel-{node}.log"),
        env,
    )


def start_waypoint(
    lab: Lab, w: dict, config_path: str, env: dict | None = None, own_files: bool = False
) -> subprocess.Popen:
    """`dabba waypoint run` in its pod (w: one of lab.waypoints), with its node's agent
    configuration (the agent must have joined), or with own_files as the Kubernetes
    Deployment runs it: the control plane's address and its own pod's certificate folder and
    trust bundle, nothing else of the agent's. The lab's control plane gets a route back to
    the waypoint's pod (as a cluster's pods reach its control plane); other pods have none."""
    pod, node = lab.pod(w["name"]), lab.node(w["node"])
    lab.run("lab", ["ip", "route", "replace", f"{pod.ip}/32", "via", node.ip])
    if own_files:
        from ..node import config as nodeconfig
        from ..node.identity import CertStore

        acfg = nodeconfig.load(config_path)
        store = CertStore(acfg.state_dir)
        how = ["--control", acfg.control.address,
               "--certs", store.workload_dir(w["namespace"], w["name"]),
               "--ca-file", store.node_paths()[2]]  # fmt: skip
    else:
        how = ["--config", config_path]
    return _spawn(
        lab,
        w["name"],
        [sys.executable, "-m", "agent.cli", "waypoint", "run", "--name", w["name"],
         "--namespace", w["namespace"], *how,
         "--workdir", os.path.join(paths(lab)["root"], "waypoints", w["namespace"], w["name"])],
        os.path.join(paths(lab)["logs"], f"waypoint-{w['namespace']}-{w['name']}.log"),
        env,
    )  # fmt: skip


def waypoint_ready(lab: Lab, w: dict) -> bool:
    r = lab.run(w["name"], ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                            "http://127.0.0.1:15021/healthz/ready"], check=False)  # fmt: skip
    return r.stdout.strip() == "200"


def agent_status(lab: Lab, node: str) -> dict | None:
    path = os.path.join(STATE_DIR, lab.name, node, "status.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ready(lab: Lab, node: str) -> bool:
    """The agent is connected, holds a certificate for each of its pods, and its tunnel (if any) is up."""
    st = agent_status(lab, node)
    ctl = (st or {}).get("control") or {}
    want = {f"{p.namespace}/{p.name}" for p in lab.pods_on(node)}
    tun = (st or {}).get("tunnel") or {}
    return (
        bool(ctl.get("connected"))
        and want <= set(ctl.get("certs", {}))
        and bool(tun.get("ready"))
        and bool(tun.get("capturing", True))
    )


def up(
    lab: Lab,
    workload_ttl: str = "24h",
    capture: bool = False,
    node_ttl: str = "7d",
    tunnel_workers="1",
    tunnel_service: bool = False,
    env: dict | None = None,
    host_addresses: bool = False,
    source: str = "files",
    max_connections: int | None = None,
    same_node: str = "direct",
    control_args: tuple[str, ...] = (),
) -> dict[str, subprocess.Popen]:
    """Control plane and agents; with capture, every agent also runs its node's tunnel, or with
    tunnel_service the tunnel runs as a process of its own ("<node>-tunnel"), as under systemd.
    env: extra environment of agents and tunnels (NOTIFY_SOCKET, WATCHDOG_USEC).
    source "kubernetes": the control plane lists an API-server stand-in ("kubeapi") that
    serves the lab's pods by UID (give the lab kubelet_cgroups: the agents find them so)."""
    procs = {}
    if source == "kubernetes":
        for d in (paths(lab)["kube"], paths(lab)["logs"]):
            os.makedirs(d, exist_ok=True)
        write_kube_objects(lab, kube_objects(lab))
        procs["kubeapi"] = start_kube_api(lab)
    procs["control"] = start_control(lab, workload_ttl, node_ttl, source, control_args)
    for n in lab.nodes:
        path = node_config(
            lab, n.name, capture, str(tunnel_workers), tunnel_service, host_addresses,
            max_connections, same_node,
        )  # fmt: skip
        procs[n.name] = start_agent(lab, n.name, path, env)
        if capture and tunnel_service:
            procs[f"{n.name}-tunnel"] = start_tunnel(lab, n.name, path, env)
    for n in lab.nodes:
        _wait(
            lambda n=n: ready(lab, n.name),
            120,
            f"the agent of {n.name} to join and get certificates",
            procs[n.name],
        )
    for w in lab.waypoints:
        key = f"waypoint-{w['namespace']}/{w['name']}"
        procs[key] = start_waypoint(lab, w, os.path.join(paths(lab)["root"], f"{w['node']}.yaml"))
    for w in lab.waypoints:
        key = f"waypoint-{w['namespace']}/{w['name']}"
        _wait(lambda w=w: waypoint_ready(lab, w), 60, f"waypoint {w['namespace']}/{w['name']}",
              procs[key])  # fmt: skip
    return procs


def _wait(pred, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            log_path = getattr(proc, "log_path", "")
            tail = ""
            if log_path:
                with open(log_path, errors="replace") as f:
                    tail = "".join(f.readlines()[-8:])
            raise DabbaError(
                f"{what}: the process exited with {proc.returncode}; the end of {log_path}:\n{tail}"
            )
        time.sleep(0.1)
    raise DabbaError(f"timed out after {timeout:.0f}s waiting for {what}")
