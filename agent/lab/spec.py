"""The lab's cluster description: nodes, pods, services (from flags or a YAML file)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

import yaml

from ..errors import DabbaError

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?$")
POD_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")

UNDERLAY = ipaddress.ip_network("10.10.0.0/24")  # node addresses, on the lab bridge
POD_SUPERNET = "10.20.{node}.0/24"  # one /24 per node
# IPv6 (dual stack): the same plan, a /64 per node; the lab bridge's own /64 for nodes
UNDERLAY6 = "fd00:10::{host}"
POD_SUPERNET6 = "fd00:20:{node}::/64"
MAX_NODES = 200
MAX_PODS_PER_NODE = 200


@dataclass
class PodSpec:
    """A pod: one network namespace and one cgroup, on one node."""

    name: str
    node: str
    namespace: str = "default"
    service_account: str = "default"
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class ServicePort:
    port: int
    target_port: int
    name: str = ""


@dataclass
class ServiceSpec:
    """A service: a virtual IP whose connections go to the pods its selector picks."""

    name: str
    vip: str
    ports: list[ServicePort]
    selector: dict[str, str]
    namespace: str = "default"
    lb_policy: str = "round_robin"
    labels: dict[str, str] = field(default_factory=dict)  # reach the registry (use-waypoint)


@dataclass
class WaypointSpec:
    """A waypoint (Gateway of class istio-waypoint) and the node its pod runs on: the pod is
    named after it, runs as the service account named after it and carries Istio's
    gateway-name label, as Istio makes a waypoint's pods."""

    name: str
    node: str
    namespace: str = "default"


@dataclass
class ClusterSpec:
    """Nodes are named n1..nN."""

    nodes: int
    pods: list[PodSpec]
    services: list[ServiceSpec] = field(default_factory=list)
    # pods' cgroups named as the kubelet names them (kubepods-besteffort-pod<uid>.slice) below
    # their node's cgroup, for the Kubernetes source, which knows a pod by its UID only
    kubelet_cgroups: bool = False
    waypoints: list[WaypointSpec] = field(default_factory=list)

    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]


def default_spec(nodes: int = 2, pods_per_node: int = 2) -> ClusterSpec:
    """Pods p1..pM on every node (named <node>-p<j>)."""
    check_counts(nodes, pods_per_node)
    pods = [
        PodSpec(
            name=f"n{i}-p{j}",
            node=f"n{i}",
            service_account=f"sa-n{i}-p{j}",
            labels={"app": f"n{i}-p{j}"},
        )
        for i in range(1, nodes + 1)
        for j in range(1, pods_per_node + 1)
    ]
    return ClusterSpec(nodes, pods)


def check_counts(nodes: int, pods_per_node: int) -> None:
    if not 1 <= nodes <= MAX_NODES:
        raise DabbaError(f"--nodes must be between 1 and {MAX_NODES}, not {nodes}")
    if not 0 <= pods_per_node <= MAX_PODS_PER_NODE:
        raise DabbaError(
            f"--pods-per-node must be between 0 and {MAX_PODS_PER_NODE}, not {pods_per_node}"
        )


def _where(path: str, node) -> str:
    mark = getattr(node, "start_mark", None)
    return f"{path}:{mark.line + 1}" if mark else path


def load_spec(path: str, nodes: int | None = None) -> ClusterSpec:
    """Parse a cluster YAML; errors name the file, the line and the field."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise DabbaError(f"cannot read cluster file {path}: {e.strerror}") from None
    try:
        root = yaml.compose(text)
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise DabbaError(f"{path}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(doc, dict):
        raise DabbaError(f"{path}: the cluster file must be a mapping with nodes, pods, services")

    def node_of(key: str):
        if root is None:
            return None
        for k, v in root.value:
            if k.value == key:
                return v
        return None

    def fail(key: str, idx: int | None, msg: str):
        n = node_of(key)
        if n is not None and idx is not None and hasattr(n, "value") and idx < len(n.value):
            n = n.value[idx]
        raise DabbaError(f"{_where(path, n)}: {msg}")

    unknown = set(doc) - {"nodes", "pods", "services", "waypoints"}
    if unknown:
        fail(
            sorted(unknown)[0],
            None,
            f"unknown field {sorted(unknown)[0]!r} (expected nodes, pods, services, waypoints)",
        )
    n_nodes = nodes if nodes is not None else doc.get("nodes", 2)
    if not isinstance(n_nodes, int):
        fail("nodes", None, f"nodes must be a number, not {n_nodes!r}")
    check_counts(n_nodes, 0)
    node_names = [f"n{i}" for i in range(1, n_nodes + 1)]

    pods: list[PodSpec] = []
    seen: set[str] = set()
    for i, p in enumerate(doc.get("pods") or []):
        if not isinstance(p, dict) or "name" not in p:
            fail("pods", i, "each pod needs a name")
        name = str(p["name"])
        if not POD_RE.match(name):
            fail(
                "pods",
                i,
                f"pod name {name!r} must be lowercase letters, digits and '-' (at most 42)",
            )
        if name in seen or name in node_names:
            fail("pods", i, f"pod name {name!r} is used twice")
        seen.add(name)
        node = str(p.get("node", node_names[len(pods) % n_nodes]))
        if node not in node_names:
            fail(
                "pods",
                i,
                f"pod {name}: node {node!r} does not exist (nodes: {', '.join(node_names)})",
            )
        labels = p.get("labels") or {}
        if not isinstance(labels, dict):
            fail("pods", i, f"pod {name}: labels must be a mapping")
        extra = set(p) - {"name", "node", "namespace", "serviceAccount", "labels"}
        if extra:
            fail("pods", i, f"pod {name}: unknown field {sorted(extra)[0]!r}")
        pods.append(
            PodSpec(
                name=name,
                node=node,
                namespace=str(p.get("namespace", "default")),
                service_account=str(p.get("serviceAccount", "default")),
                labels={str(k): str(v) for k, v in labels.items()},
            )
        )
    per_node = {n: sum(1 for p in pods if p.node == n) for n in node_names}
    if max(per_node.values(), default=0) > MAX_PODS_PER_NODE:
        raise DabbaError(f"{path}: at most {MAX_PODS_PER_NODE} pods per node")

    services: list[ServiceSpec] = []
    for i, s in enumerate(doc.get("services") or []):
        if not isinstance(s, dict):
            fail("services", i, "each service must be a mapping")
        for req in ("name", "vip", "ports"):
            if req not in s:
                fail("services", i, f"service needs {req!r}")
        try:
            ipaddress.IPv4Address(str(s["vip"]))
        except ValueError:
            fail("services", i, f"service {s['name']}: vip {s['vip']!r} is not an IPv4 address")
        ports = []
        for sp in s["ports"]:
            if isinstance(sp, int):
                sp = {"port": sp}
            port = sp.get("port")
            tp = sp.get("targetPort", port)
            if (
                not isinstance(port, int)
                or not 0 < port < 65536
                or not isinstance(tp, int)
                or not 0 < tp < 65536
            ):
                fail("services", i, f"service {s['name']}: bad port {sp!r}")
            ports.append(ServicePort(port, tp, str(sp.get("name", ""))))
        labels = s.get("labels") or {}
        if not isinstance(labels, dict):
            fail("services", i, f"service {s['name']}: labels must be a mapping")
        services.append(
            ServiceSpec(
                name=str(s["name"]),
                namespace=str(s.get("namespace", "default")),
                vip=str(s["vip"]),
                ports=ports,
                selector={str(k): str(v) for k, v in (s.get("selector") or {}).items()},
                lb_policy=str(s.get("lbPolicy", "round_robin")),
                labels={str(k): str(v) for k, v in labels.items()},
            )
        )
    waypoints: list[WaypointSpec] = []
    for i, w in enumerate(doc.get("waypoints") or []):
        if not isinstance(w, dict) or "name" not in w:
            fail("waypoints", i, "each waypoint needs a name")
        extra = set(w) - {"name", "node", "namespace"}
        if extra:
            fail("waypoints", i, f"waypoint {w['name']}: unknown field {sorted(extra)[0]!r}")
        name = str(w["name"])
        if not POD_RE.match(name) or name in seen or name in node_names:
            fail("waypoints", i, f"waypoint {name!r}: its pod's name must be free and "
                                 "lowercase letters, digits and '-' (at most 42)")  # fmt: skip
        seen.add(name)
        node = str(w.get("node", node_names[0]))
        if node not in node_names:
            fail("waypoints", i, f"waypoint {name}: node {node!r} does not exist")
        waypoints.append(WaypointSpec(name, node, str(w.get("namespace", "default"))))
    return ClusterSpec(n_nodes, pods, services, waypoints=waypoints)
