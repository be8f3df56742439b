"""A cluster on one machine: network namespaces, veth pairs, bridges and cgroups.

Layout of lab NAME (every name carries the lab's, so labs coexist)::

    netns dl.NAME              the lab's own: bridge br0 joins the nodes; the control
                               plane (--mesh) listens on 10.10.0.1 there
    netns dl.NAME.nI           node nI: eth0 10.10.0.(10+I) on br0; bridge cbr0
                               10.20.I.1/24 for its pods; routes to the other
                               nodes' pod /24s; forwarding on
    netns dl.NAME.POD          a pod: eth0 10.20.I.(10+J), default via 10.20.I.1
    cgroup <cg2>/dabba.NAME/nI         node cgroup (the datapath attaches here)
    cgroup <cg2>/dabba.NAME/nI/POD     the pod's processes
    cgroup <cg2>/dabba.NAME/nI/_node   the node's own processes (agent, tunnel)
    bpffs  <bpffs>/dabba/NAME_nI       the node's pinned programs and maps
                                       (bpffs refuses '.' in names; lab
                                       names never contain '_')

Nothing is created in the root network namespace. ``down`` finds every
object by these names, so it also cleans up after a crash that lost the
state file, and running it twice is fine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field

from .. import log
from ..bpf import features
from ..control.model import GATEWAY_NAME_LABEL
from ..errors import DabbaError
from . import spec as specmod

STATE_DIR = os.environ.get("DABBA_LAB_STATE", "/run/dabba/labs")
CONTROL_IP = "10.10.0.1"  # on the lab bridge, in the lab's own namespace
CONTROL_IP6 = "fd00:10::1"
NETNS_DIR = "/run/netns"
_log = log.get("lab")


@dataclass
class Pod:
    name: str
    node: str
    ip: str
    netns: str
    cgroup: str
    namespace: str = "default"
    service_account: str = "default"
    labels: dict = field(default_factory=dict)
    uid: str = ""  # as a Kubernetes pod's (the lab's Kubernetes mode knows the pod by it)
    ip6: str = ""  # dual stack: its IPv6 address ("" in a lab from before IPv6)


def pod_uid(lab_name: str, pod: str) -> str:
    """A stable UID for a lab pod, shaped like the API server's."""
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dabba-lab/{lab_name}/{pod}"))


@dataclass
class Node:
    name: str
    ip: str  # on the lab bridge
    gateway: str  # on cbr0: the pods' gateway, where the node tunnel listens
    pod_cidr: str
    netns: str
    cgroup: str  # the node cgroup (programs attach here)
    system_cgroup: str  # for the node's own processes
    bpf_node: str  # datapath node name: pins under <bpffs>/dabba/<bpf_node>
    ip6: str = ""  # on the lab bridge, IPv6
    gateway6: str = ""  # on cbr0, IPv6: where the node tunnel's IPv6 outbound listener is
    pod_cidr6: str = ""


@dataclass
class Lab:
    """A created lab, as recorded in its state file."""

    name: str
    netns: str
    cgroup: str
    nodes: list[Node]
    pods: list[Pod]
    services: list[dict] = field(default_factory=list)
    created: float = 0.0
    waypoints: list[dict] = field(default_factory=list)  # name, node, namespace (its pod's)

    # -- lookups --
    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise DabbaError(
            f"lab {self.name} has no node {name!r} (nodes: {', '.join(n.name for n in self.nodes)})"
        )

    def pod(self, name: str) -> Pod:
        for p in self.pods:
            if p.name == name:
                return p
        raise DabbaError(
            f"lab {self.name} has no pod {name!r} (pods: {', '.join(p.name for p in self.pods)})"
        )

    def target(self, name: str) -> tuple[str, str]:
        """(netns, cgroup) of a pod or node name."""
        for p in self.pods:
            if p.name == name:
                return p.netns, p.cgroup
        for n in self.nodes:
            if n.name == name:
                return n.netns, n.system_cgroup
        if name == "lab":
            return self.netns, os.path.join(self.cgroup, "_control")
        raise DabbaError(
            f"lab {self.name} has no pod or node {name!r}",
            hint=f"targets: {', '.join([n.name for n in self.nodes] + [p.name for p in self.pods])}",
        )

    def pods_on(self, node: str) -> list[Pod]:
        return [p for p in self.pods if p.node == node]

    # -- running commands --
    def command(self, target: str, argv: list[str]) -> tuple[list[str], callable]:
        """argv and preexec_fn that run argv inside target's netns and cgroup.

        nsenter --net changes the network namespace only; `ip netns exec`
        would also mount a fresh /sys, hiding bpffs (/sys/fs/bpf) from the
        node's tunnel, which reads pinned maps.
        """
        netns, cgroup = self.target(target)
        procs = os.path.join(cgroup, "cgroup.procs")

        def enter_cgroup() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return ["nsenter", f"--net={os.path.join(NETNS_DIR, netns)}", "--", *argv], enter_cgroup

    def popen(self, target: str, argv: list[str], **kw) -> subprocess.Popen:
        full, pre = self.command(target, argv)
        return subprocess.Popen(full, preexec_fn=pre, **kw)

    def run(
        self, target: str, argv: list[str], check: bool = True, **kw
    ) -> subprocess.CompletedProcess:
        full, pre = self.command(target, argv)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        r = subprocess.run(full, preexec_fn=pre, **kw)
        if check and r.returncode != 0:
            raise DabbaError(
                f"`{' '.join(argv)}` in {target} exited {r.returncode}: {(r.stderr or '').strip()}"
            )
        return r

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Lab:
        return cls(
            name=d["name"],
            netns=d["netns"],
            cgroup=d["cgroup"],
            nodes=[Node(**n) for n in d["nodes"]],
            pods=[Pod(**p) for p in d["pods"]],
            services=d.get("services", []),
            created=d.get("created", 0.0),
            waypoints=d.get("waypoints", []),
        )


# ---- naming ------------------------------------------------------------------------


def lab_netns(name: str) -> str:
    return f"dl.{name}"


def lab_cgroup(name: str, cg_root: str | None = None) -> str:
    return os.path.join(cg_root or features.cgroup2_root(), f"dabba.{name}")


def bpf_node_name(lab: str, node: str) -> str:
    return f"{lab}_{node}"


def state_path(name: str) -> str:
    return os.path.join(STATE_DIR, f"{name}.json")


def check_name(name: str) -> None:
    if not specmod.NAME_RE.match(name or ""):
        raise DabbaError(
            f"invalid lab name {name!r}: 1-12 lowercase letters, digits or '-', starting and ending "
            "with a letter or digit"
        )


# ---- shell helpers -------------------------------------------------------------------


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip"] + (["-n", ns] if ns else []) + list(args)
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise DabbaError(f"`{' '.join(argv)}` failed: {r.stderr.strip()}")


def _sysctl(ns: str, key: str, value: str) -> None:
    r = subprocess.run(
        ["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise DabbaError(f"sysctl {key}={value} in {ns} failed: {r.stderr.strip()}")


def _netns_exists(ns: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, ns))


PIN_PARENT = "/sys/fs/bpf/dabba"


def _list_pins() -> list[str]:
    try:
        return sorted(os.listdir(PIN_PARENT))
    except FileNotFoundError:
        return []


def _list_netns(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n == prefix or n.startswith(prefix + "."))
    except FileNotFoundError:
        return []


# ---- create / destroy ----------------------------------------------------------------------


def up(name: str, spec: specmod.ClusterSpec) -> Lab:
    """Create lab NAME from spec; on any failure, remove what was made and re-raise."""
    check_name(name)
    cg_root = features.cgroup2_root()
    if (
        os.path.exists(state_path(name))
        or _netns_exists(lab_netns(name))
        or os.path.exists(lab_cgroup(name, cg_root))
    ):
        raise DabbaError(
            f"a lab named {name!r} already exists",
            hint=f"pick another --name, or remove it with `dabba lab down {name}`",
        )
    stale = [e for e in _list_pins() if e.startswith(name + "_")]
    if stale:
        raise DabbaError(
            f"pinned datapaths of an earlier lab named {name!r} are still there: {', '.join(stale)}",
            hint=f"remove them with `dabba lab down {name}`",
        )
    lab = Lab(
        name=name,
        netns=lab_netns(name),
        cgroup=lab_cgroup(name, cg_root),
        nodes=[],
        pods=[],
        created=time.time(),
    )
    lab.services = [asdict(s) for s in spec.services]
    lab.waypoints = [asdict(w) for w in spec.waypoints]
    # each waypoint's pod, as Istio makes it: named after it, its service account, its label
    spec = dataclasses.replace(spec, pods=[*spec.pods, *(
        specmod.PodSpec(w.name, w.node, w.namespace, w.name, {GATEWAY_NAME_LABEL: w.name})
        for w in spec.waypoints)])  # fmt: skip
    try:
        _create(lab, spec)
        os.makedirs(STATE_DIR, exist_ok=True)
        tmp = state_path(name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(lab.as_dict(), f, indent=1)
        os.replace(tmp, state_path(name))
    except BaseException:
        _log.warning("lab creation failed; removing what was created", fields={"lab": name})
        down(name, quiet=True)
        raise
    _log.info("lab up", fields={"lab": name, "nodes": len(lab.nodes), "pods": len(lab.pods)})
    return lab


def _create(lab: Lab, spec: specmod.ClusterSpec) -> None:
    # the lab's own namespace and bridge
    _ip("netns", "add", lab.netns)
    _ip("link", "set", "lo", "up", ns=lab.netns)
    _ip("link", "add", "br0", "type", "bridge", ns=lab.netns)
    _ip(
        "addr", "add", f"{CONTROL_IP}/24", "dev", "br0", ns=lab.netns
    )  # the control plane's address
    _ip("-6", "addr", "add", f"{CONTROL_IP6}/64", "dev", "br0", "nodad", ns=lab.netns)
    _ip("link", "set", "br0", "up", ns=lab.netns)
    os.makedirs(os.path.join(lab.cgroup, "_control"))
    node_ips = {}
    for i, nname in enumerate(spec.node_names(), start=1):
        node_ips[nname] = (i, f"10.10.0.{10 + i}")
    for nname, (i, nip) in node_ips.items():
        ns = f"{lab.netns}.{nname}"
        cg = os.path.join(lab.cgroup, nname)
        node = Node(
            name=nname,
            ip=nip,
            gateway=f"10.20.{i}.1",
            pod_cidr=specmod.POD_SUPERNET.format(node=i),
            netns=ns,
            cgroup=cg,
            system_cgroup=os.path.join(cg, "_node"),
            bpf_node=bpf_node_name(lab.name, nname),
            ip6=specmod.UNDERLAY6.format(host=10 + i),
            gateway6=specmod.POD_SUPERNET6.format(node=i).replace("::/64", "::1"),
            pod_cidr6=specmod.POD_SUPERNET6.format(node=i),
        )
        lab.nodes.append(node)
        _ip("netns", "add", ns)
        _ip("link", "set", "lo", "up", ns=ns)
        _ip("link", "add", nname, "type", "veth", "peer", "name", "eth0", "netns", ns, ns=lab.netns)
        _ip("link", "set", nname, "master", "br0", "up", ns=lab.netns)
        _ip("addr", "add", f"{nip}/24", "dev", "eth0", ns=ns)
        _ip("-6", "addr", "add", f"{node.ip6}/64", "dev", "eth0", "nodad", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        _ip("link", "add", "cbr0", "type", "bridge", ns=ns)
        _ip("addr", "add", f"{node.gateway}/24", "dev", "cbr0", ns=ns)
        _ip("-6", "addr", "add", f"{node.gateway6}/64", "dev", "cbr0", "nodad", ns=ns)
        _ip("link", "set", "cbr0", "up", ns=ns)
        _sysctl(ns, "net.ipv4.ip_forward", "1")
        _sysctl(ns, "net.ipv6.conf.all.forwarding", "1")
        os.makedirs(node.system_cgroup)
    for node in lab.nodes:
        for other in lab.nodes:
            if other is not node:
                _ip("route", "add", other.pod_cidr, "via", other.ip, ns=node.netns)
                _ip("-6", "route", "add", other.pod_cidr6, "via", other.ip6, ns=node.netns)
    counters: dict[str, int] = {}
    for p in spec.pods:
        node = lab.node(p.node)
        j = counters[p.node] = counters.get(p.node, 0) + 1
        i = node_ips[p.node][0]
        uid = pod_uid(lab.name, p.name)
        pod = Pod(
            name=p.name,
            node=p.node,
            ip=f"10.20.{i}.{10 + j}",
            netns=f"{lab.netns}.{p.name}",
            cgroup=os.path.join(
                node.cgroup,
                f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"
                if spec.kubelet_cgroups
                else p.name,
            ),
            namespace=p.namespace,
            service_account=p.service_account,
            labels=dict(p.labels),
            uid=uid,
            ip6=node.pod_cidr6.replace("::/64", f"::{10 + j:x}"),
        )
        lab.pods.append(pod)
        veth = f"v{j}"
        _ip("netns", "add", pod.netns)
        _ip("link", "set", "lo", "up", ns=pod.netns)
        _ip(
            "link",
            "add",
            veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.netns,
            ns=node.netns,
        )
        _ip("link", "set", veth, "master", "cbr0", "up", ns=node.netns)
        _ip("addr", "add", f"{pod.ip}/24", "dev", "eth0", ns=pod.netns)
        _ip("-6", "addr", "add", f"{pod.ip6}/64", "dev", "eth0", "nodad", ns=pod.netns)
        _ip("link", "set", "eth0", "up", ns=pod.netns)
        _ip("route", "add", "default", "via", node.gateway, ns=pod.netns)
        _ip("-6", "route", "add", "default", "via", node.gateway6, ns=pod.netns)
        os.makedirs(pod.cgroup)


def load(name: str) -> Lab:
    """The lab recorded in the state file."""
    check_name(name)
    try:
        with open(state_path(name)) as f:
            return Lab.from_dict(json.load(f))
    except FileNotFoundError:
        raise DabbaError(f"no lab named {name!r}", hint="`dabba lab ls` lists the labs") from None


def ls() -> list[Lab]:
    labs = []
    with contextlib.suppress(FileNotFoundError):
        for f in sorted(os.listdir(STATE_DIR)):
            if f.endswith(".json"):
                with contextlib.suppress(Exception):
                    labs.append(load(f[:-5]))
    return labs


def _kill_cgroup_tree(path: str) -> None:
    """Kill every process in a cgroup tree the lab created (cgroup.kill), and wait."""
    kill = os.path.join(path, "cgroup.kill")
    if os.path.exists(kill):
        with contextlib.suppress(OSError):
            with open(kill, "w") as f:
                f.write("1")
    else:  # kernels before 5.14
        for dirpath, _, _ in os.walk(path):
            with contextlib.suppress(OSError), open(os.path.join(dirpath, "cgroup.procs")) as f:
                for pid in f.read().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.events")) as f:
            if "populated 0" in f.read():
                return
        time.sleep(0.02)


def _rm_cgroup_tree(path: str) -> None:
    for dirpath, _, _ in sorted(os.walk(path), key=lambda t: -t[0].count("/")):
        for _ in range(50):
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                time.sleep(0.02)


def down(name: str, quiet: bool = False) -> bool:
    """Remove everything of lab NAME: processes, pins, namespaces, cgroups, state.

    Works from names alone when the state file is gone; returns whether
    anything was found.
    """
    check_name(name)
    from ..bpf.loader import Datapath

    found = False
    cg = None
    with contextlib.suppress(DabbaError):
        cg = lab_cgroup(name)
    if cg and os.path.isdir(cg):
        found = True
        _kill_cgroup_tree(cg)
    # pins: <bpffs>/dabba/<name>_<node>
    for entry in _list_pins():
        if entry.startswith(name + "_"):
            found = True
            node = entry[len(name) + 1 :]
            Datapath(entry, os.path.join(cg or "/nonexistent", node)).remove()
    for ns in reversed(_list_netns(lab_netns(name))):
        found = True
        with contextlib.suppress(DabbaError):
            _ip("netns", "del", ns)
    if cg and os.path.isdir(cg):
        _rm_cgroup_tree(cg)
    if os.path.exists(state_path(name)):
        found = True
        os.unlink(state_path(name))
    shutil.rmtree(os.path.join(STATE_DIR, name), ignore_errors=True)  # mesh state, logs
    if not quiet:
        _log.info("lab down" if found else "lab not found, nothing to remove", fields={"lab": name})
    return found


def agent_config(lab: Lab, node_name: str, strict: tuple[str, ...] = ()) -> dict:
    """The agent config (as a dict) for one node of the lab: every pod enrolled."""
    node = lab.node(node_name)
    return {
        "node": node.name,
        "pin_name": node.bpf_node,
        "cgroup": node.cgroup,
        "state_dir": os.path.join(STATE_DIR, lab.name, node.name),
        "tunnel": {"address": node.gateway, "address6": node.gateway6, "port": 15001},
        "tunnel_addresses": [node.gateway, node.gateway6],
        # the lab runs on whatever kernel the machine has: packet sockets are refused where it
        # can (the BPF LSM); elsewhere the agent says so (dabba status) instead of not starting
        "capture": {"packet_sockets": "refuse-where-able"},
        "workloads": [
            {
                "name": p.name,
                "namespace": p.namespace,
                "service_account": p.service_account,
                "cgroup": p.cgroup,
                "ip": p.ip,
                "labels": p.labels,
                "capture": True,
                "strict": p.name in strict,
            }
            for p in lab.pods_on(node.name)
        ],
    }
