"""The node agent's configuration: one typed object, every field documented.

A YAML file (``dabba agent run --config FILE``)::

    node: n1                      # this node's name (required)
    cgroup: /sys/fs/cgroup/unified/kubepods   # cgroup v2 folder holding the
                                  # node's workloads; programs attach here (required)
    bpffs: /sys/fs/bpf            # bpffs mount; pins go to <bpffs>/dabba/<pin_name>
    pin_name: n1                  # default: node
    state_dir: /run/dabba/n1      # runtime files of the agent (status)
    tunnel:
      address: 10.20.1.1          # the tunnel's outbound listener, where
      port: 15001                 # captured connect()s are sent
      address6: fd00:20:1::1      # its IPv6 outbound listener (same port), for workloads'
                                  # native IPv6; unset: their native IPv6 is refused (EPERM)
      mark: 0                     # SO_MARK of the tunnel's own sockets (never captured)
      run: false                  # start and supervise the tunnel (with control)
      inbound: 10.10.0.11:15008   # its HBONE listener (default: control.node_address:15008)
      drain: 30                   # seconds open flows may go on when the tunnel stops
      workers: 1                  # tunnel processes on the same ports, or auto (as the load asks)
      spread: 20000-21023         # ports of address (and address6) a captured connect() is sent
                                  # to, one at random; the kernel (own.c) hands them to the
                                  # listener on port. A workload's closed connections (TIME_WAIT,
                                  # 60 s) then spread over these destinations: on one port alone
                                  # a workload runs out of local ports after ~28,000 connections
                                  # a minute. "": port alone
    tunnel_addresses: [10.20.1.1] # the tunnel's own sources: what STRICT and PERMISSIVE workloads
                                  # accept as the tunnel; the tunnel connects to this node's
                                  # workloads from the first of each family (default:
                                  # [tunnel.address, tunnel.address6])
    capture:
      enabled: true               # false: account and guard only (until a tunnel runs)
      exclude_cidrs: [127.0.0.0/8]  # destinations (IPv4 or IPv6) that bypass capture (direct, from
      exclude_ports: []           # the workload's own address; never to a mesh port)
      non_tcp: dns                # dns: of UDP only DNS (port 53) and loopback leave; raw,
                                  # ping and other inet sockets are refused. pass: all non-TCP
                                  # passes unmeshed (as Istio's ambient mode does). STRICT
                                  # workloads receive no plaintext UDP but DNS either way.
      max_connections: 4096       # captured connections one workload may hold open (more are
                                  # refused, EPERM, counted); default: a quarter of
                                  # maps.captures, so one workload leaves the others 3/4
      same_node: direct           # direct: a connection between two workloads of this node
                                  # goes straight through the kernel when the node's compiled
                                  # policy verdicts allow it (refused, EPERM, when they deny);
                                  # tunnel: through the tunnel, as across nodes
      packet_sockets: refuse      # workloads' packet (AF_PACKET) and other non-IP network
                                  # sockets: refused in the kernel (BPF LSM, lsm/socket_create).
                                  # refuse: where this kernel cannot (no "bpf" in lsm=), the
                                  # agent does not start. refuse-where-able: it starts anyway
                                  # and says so (for nodes whose workloads hold no CAP_NET_RAW).
    services:                     # services resolved in the kernel (capture.same_node: direct)
      eject_after: 3              # consecutive failed connects that eject an endpoint
      eject_time: 30              # seconds out, doubled on each ejection in a row (at most 10x)
      max_ejected: 0.5            # the most of a service's endpoints ever out at once
    control:                      # optional: workloads, policies and certificates
      address: 10.10.0.1:15012    # from the control plane (mutual TLS)
      join_address: 10.10.0.1:15013  # where the one-time join token is used (TLS)
      ca_file: /etc/dabba/ca.pem  # the control plane's root, trusted on first contact
      token_file: /etc/dabba/join-token
      node_address: 10.10.0.11    # where other nodes reach this node's tunnel
    maps:                         # sizes, fixed when the programs are first loaded
      workloads: 4096
      captures: 16384
      flows: 65536
      ring_pages: 256
      splice: 16384
    flows:
      keep_closed: 10000          # closed flows kept in memory for `dabba flows`
    workloads:                    # workloads of this node (with a control plane: only
                                  # their cgroups; the control plane says which exist)
      - name: web-1
        namespace: default
        service_account: web
        cgroup: /sys/fs/cgroup/unified/kubepods/web-1
        ip: 10.20.1.11
        capture: true             # redirect its outbound connections to the tunnel
        strict: false             # accept inbound connections only from the tunnel

Environment variables override nothing; the file is the whole truth, so
``--check`` tells exactly what the agent will do.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import asdict, dataclass, field

import yaml

from ..bpf.loader import MapSizes
from ..errors import DabbaError

DEFAULT_BPFFS = "/sys/fs/bpf"
DEFAULT_TUNNEL_PORT = 15001
DEFAULT_KEEP_CLOSED = 10000
DEFAULT_SPREAD = "20000-21023"
DEFAULT_EXCLUDE_CIDRS = ("127.0.0.0/8",)


@dataclass
class TunnelConfig:
    """Where captured connections go, and whether the agent runs the tunnel."""

    address: str
    port: int = DEFAULT_TUNNEL_PORT
    mark: int = 0
    run: bool = False  # start and supervise `dabba tunnel run` (needs control)
    inbound: str = ""  # HBONE listener IP:PORT (default: control.node_address:15008)
    drain: float = 30.0  # seconds open flows may go on when the tunnel stops or is upgraded
    workers: str = "1"  # tunnel processes sharing the ports, or "auto"
    address6: str = ""  # IPv6 outbound listener (same port); "": native IPv6 is refused
    spread: tuple[int, int] = (20000, 1024)  # (first port, count) captured connects go to


def _spread(value, port: int, need) -> tuple[int, int]:
    """tunnel.spread "FIRST-LAST" -> (FIRST, count); "" -> (0, 0). Never a mesh port."""
    if value in ("", None, 0):
        return (0, 0)
    where = ("tunnel", "spread")
    first, sep, last = str(value).partition("-")
    ok = sep and first.strip().isdigit() and last.strip().isdigit()
    need(ok, where, f'tunnel.spread {value!r} must be a port range FIRST-LAST, or ""')
    lo, hi = int(first), int(last)
    need(
        1024 <= lo <= hi <= 65535 and hi - lo < 65535,
        where,
        f"tunnel.spread {value!r}: ports from 1024 to 65535, the first not above the last",
    )
    mesh = [p for p in (15000, 15001, 15006, 15008, 15020, 15021, port) if lo <= p <= hi]
    need(
        not mesh,
        where,
        f"tunnel.spread {value!r} holds the mesh's own port {mesh[0] if mesh else ''}: "
        "choose a range without 15000-15021 and tunnel.port",
    )
    return (lo, hi - lo + 1)


@dataclass
class ControlLink:
    """How the agent reaches the control plane."""

    address: str
    join_address: str
    ca_file: str
    token_file: str
    node_address: str


@dataclass
class CaptureConfig:
    """Whether enrolled workloads are captured, and destinations that bypass capture."""

    enabled: bool = True
    exclude_cidrs: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE_CIDRS))
    exclude_ports: list[int] = field(default_factory=list)
    non_tcp: str = "dns"  # "dns" | "pass" (see the module docstring)
    packet_sockets: str = "refuse"  # "refuse" | "refuse-where-able" (the module docstring)
    max_connections: int | None = None  # per workload; None: maps.captures // 4
    same_node: str = "direct"  # "direct" | "tunnel" (see the module docstring)


@dataclass
class ServicesConfig:
    """Outlier ejection of services' endpoints, in the kernel and in the tunnel alike."""

    eject_after: int = 3
    eject_time: float = 30.0
    max_ejected: float = 0.5


NON_TCP_MODES = ("dns", "pass")
SAME_NODE_MODES = ("direct", "tunnel")
PACKET_SOCKET_MODES = ("refuse", "refuse-where-able")


@dataclass
class WorkloadConfig:
    """A workload of this node, and how the datapath treats it."""

    name: str
    cgroup: str
    namespace: str = "default"
    service_account: str = "default"
    ip: str = ""
    capture: bool = True
    strict: bool = False
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def spiffe_suffix(self) -> str:
        return f"ns/{self.namespace}/sa/{self.service_account}"


@dataclass
class AgentConfig:
    """The whole agent configuration (see the module docstring for the file format)."""

    node: str
    cgroup: str
    tunnel: TunnelConfig
    bpffs: str = DEFAULT_BPFFS
    pin_name: str = ""
    state_dir: str = ""
    tunnel_addresses: list[str] = field(default_factory=list)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    services: ServicesConfig = field(default_factory=ServicesConfig)
    maps: MapSizes = field(default_factory=MapSizes)
    keep_closed: int = DEFAULT_KEEP_CLOSED
    workloads: list[WorkloadConfig] = field(default_factory=list)
    control: ControlLink | None = None
    source: str = "<memory>"

    def __post_init__(self):
        self.pin_name = self.pin_name or self.node
        self.state_dir = self.state_dir or f"/run/dabba/{self.pin_name}"
        if not self.tunnel_addresses:
            self.tunnel_addresses = [a for a in (self.tunnel.address, self.tunnel.address6) if a]

    def tunnel_source(self, version: int) -> str:
        """The first tunnel address of an IP version (4 or 6): where the tunnel connects to this
        node's workloads from; "" when there is none."""
        return next(
            (a for a in self.tunnel_addresses if ipaddress.ip_address(a).version == version), ""
        )

    def dump(self) -> dict:
        """Everything, as the admin API and --check print it (there are no secrets here)."""
        d = asdict(self)
        d.pop("source")
        return d


def _ip6_field(value, err) -> str:
    """tunnel.address6: "" when unset, else a routable IPv6 address (err(msg) raises)."""
    if value in (None, ""):
        return ""
    try:
        a = ipaddress.IPv6Address(str(value))
    except ValueError:
        raise err(f"tunnel.address6: {value!r} is not an IPv6 address") from None
    if a.ipv4_mapped is not None or a.is_link_local or a.is_loopback or a.is_unspecified:
        raise err(
            f"tunnel.address6: {value!r} cannot be the tunnel's listener (IPv4-mapped, "
            "link-local, loopback or unspecified: workloads' connections to it are refused)"
        )
    return str(a)


def _err(path: str, node, msg: str) -> DabbaError:
    mark = getattr(node, "start_mark", None)
    where = f"{path}:{mark.line + 1}" if mark else path
    return DabbaError(f"{where}: {msg}")


def _find(node, *keys):
    """The YAML node at keys (for line numbers), or the closest parent."""
    for k in keys:
        if node is None:
            return None
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for kk, v in node.value if kk.value == k), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(k, int) and k < len(node.value):
            nxt = node.value[k]
        else:
            nxt = None
        if nxt is None:
            return node
        node = nxt
    return node


_TOP = {
    "node",
    "cgroup",
    "bpffs",
    "pin_name",
    "state_dir",
    "tunnel",
    "tunnel_addresses",
    "capture",
    "services",
    "maps",
    "flows",
    "workloads",
    "control",
}
_CONTROL = {"address", "join_address", "ca_file", "token_file", "node_address"}
_WL = {"name", "cgroup", "namespace", "service_account", "ip", "capture", "strict", "labels"}


def parse(text: str, path: str = "<config>") -> AgentConfig:
    """Parse and validate; every error names the file, the line and the field."""
    try:
        root = yaml.compose(text)
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DabbaError(
            f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML: "
            f"{getattr(e, 'problem', e)}"
        ) from None
    if not isinstance(doc, dict):
        raise DabbaError(f"{path}: the agent config must be a mapping (node, cgroup, tunnel, ...)")

    def need(cond, keys, msg):
        if not cond:
            raise _err(path, _find(root, *keys), msg)

    for k in doc:
        need(k in _TOP, (k,), f"unknown field {k!r} (known: {', '.join(sorted(_TOP))})")
    for k in ("node", "cgroup", "tunnel"):
        need(k in doc, (), f"missing required field {k!r}")
    need(
        isinstance(doc["node"], str) and doc["node"] and "/" not in doc["node"],
        ("node",),
        "node must be a name without '/'",
    )
    need(
        isinstance(doc["cgroup"], str) and os.path.isabs(doc["cgroup"]),
        ("cgroup",),
        "cgroup must be an absolute path to a cgroup v2 folder",
    )
    t = doc["tunnel"]
    need(isinstance(t, dict) and "address" in t, ("tunnel",), "tunnel needs an address")
    for addr_key in ("address",):
        try:
            ipaddress.IPv4Address(str(t[addr_key]))
        except ValueError:
            raise _err(
                path,
                _find(root, "tunnel", addr_key),
                f"tunnel.{addr_key}: {t[addr_key]!r} is not an IPv4 address",
            ) from None
    port = t.get("port", DEFAULT_TUNNEL_PORT)
    need(
        isinstance(port, int) and 0 < port < 65536,
        ("tunnel", "port"),
        f"tunnel.port {port!r} out of range",
    )
    drain = t.get("drain", 30)
    need(
        isinstance(drain, int | float) and 0 <= drain <= 3600,
        ("tunnel", "drain"),
        f"tunnel.drain {drain!r} must be seconds between 0 and 3600",
    )
    workers = t.get("workers", 1)
    need(
        workers == "auto" or (isinstance(workers, int) and 1 <= workers <= 64),
        ("tunnel", "workers"),
        f"tunnel.workers {workers!r} must be a number from 1 to 64, or auto",
    )
    spread = _spread(t.get("spread", DEFAULT_SPREAD), port, need)
    for k in t:
        need(
            k
            in {
                "address",
                "address6",
                "port",
                "mark",
                "run",
                "inbound",
                "drain",
                "workers",
                "spread",
            },  # fmt: skip
            ("tunnel", k),
            f"tunnel: unknown field {k!r}",
        )
    tunnel = TunnelConfig(
        str(t["address"]),
        port,
        int(t.get("mark", 0)),
        bool(t.get("run", False)),
        str(t.get("inbound", "")),
        float(drain),
        str(workers),
        _ip6_field(
            t.get("address6"), lambda msg: _err(path, _find(root, "tunnel", "address6"), msg)
        ),
        spread,
    )

    tun_addrs = [str(a) for a in doc.get("tunnel_addresses") or []]
    for i, a in enumerate(tun_addrs):
        try:
            tun_addrs[i] = str(ipaddress.ip_address(a))
        except ValueError:
            raise _err(
                path,
                _find(root, "tunnel_addresses", i),
                f"tunnel_addresses: {a!r} is not an IPv4 or IPv6 address",
            ) from None
    if tunnel.address6:
        need(
            not tun_addrs or any(":" in a for a in tun_addrs),
            ("tunnel_addresses",),
            "tunnel_addresses: tunnel.address6 is set but no IPv6 address is listed: the "
            "tunnel could not deliver IPv6 to STRICT workloads",
        )

    c = doc.get("capture") or {}
    for k in c:
        need(
            k
            in {
                "enabled",
                "exclude_cidrs",
                "exclude_ports",
                "non_tcp",
                "packet_sockets",
                "max_connections",
                "same_node",
            },
            ("capture", k),
            f"capture: unknown field {k!r}",
        )
    cap = CaptureConfig(
        bool(c.get("enabled", True)),
        [str(x) for x in c.get("exclude_cidrs", DEFAULT_EXCLUDE_CIDRS)],
        [int(x) for x in c.get("exclude_ports", [])],
        str(c.get("non_tcp", "dns")),
        str(c.get("packet_sockets", "refuse")),
        c.get("max_connections"),
        str(c.get("same_node", "direct")),
    )
    need(
        cap.same_node in SAME_NODE_MODES,
        ("capture", "same_node"),
        f"capture.same_node: {cap.same_node!r} is not one of {', '.join(SAME_NODE_MODES)}",
    )
    need(
        cap.max_connections is None
        or (isinstance(cap.max_connections, int) and not isinstance(cap.max_connections, bool)
            and cap.max_connections >= 0),
        ("capture", "max_connections"),
        f"capture.max_connections: {cap.max_connections!r} is not a whole number (0: no limit)",
    )  # fmt: skip
    need(
        cap.non_tcp in NON_TCP_MODES,
        ("capture", "non_tcp"),
        f"capture.non_tcp: {cap.non_tcp!r} is not one of {', '.join(NON_TCP_MODES)}",
    )
    need(
        cap.packet_sockets in PACKET_SOCKET_MODES,
        ("capture", "packet_sockets"),
        f"capture.packet_sockets: {cap.packet_sockets!r} is not one of "
        f"{', '.join(PACKET_SOCKET_MODES)}",
    )
    for i, cidr in enumerate(cap.exclude_cidrs):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise _err(
                path,
                _find(root, "capture", "exclude_cidrs", i),
                f"capture.exclude_cidrs: {cidr!r} is not an IPv4 or IPv6 CIDR",
            ) from None
    for i, p in enumerate(cap.exclude_ports):
        need(
            0 < p < 65536,
            ("capture", "exclude_ports", i),
            f"capture.exclude_ports: {p} out of range",
        )

    sv = doc.get("services") or {}
    for k in sv:
        need(
            k in ServicesConfig.__dataclass_fields__,
            ("services", k),
            f"services: unknown field {k!r} (known: eject_after, eject_time, max_ejected)",
        )
    services = ServicesConfig(
        sv.get("eject_after", 3), sv.get("eject_time", 30.0), sv.get("max_ejected", 0.5)
    )
    need(
        isinstance(services.eject_after, int) and not isinstance(services.eject_after, bool)
        and 0 <= services.eject_after <= 65535,
        ("services", "eject_after"),
        f"services.eject_after: {services.eject_after!r} is not a whole number from 0 "
        "(0: never eject) to 65535",
    )  # fmt: skip
    need(
        isinstance(services.eject_time, int | float) and not isinstance(services.eject_time, bool)
        and 0 < services.eject_time <= 3600,
        ("services", "eject_time"),
        f"services.eject_time: {services.eject_time!r} is not a number of seconds in (0, 3600]",
    )  # fmt: skip
    need(
        isinstance(services.max_ejected, int | float)
        and not isinstance(services.max_ejected, bool) and 0 <= services.max_ejected <= 1,
        ("services", "max_ejected"),
        f"services.max_ejected: {services.max_ejected!r} is not a share from 0 to 1",
    )  # fmt: skip

    m = doc.get("maps") or {}
    known = set(MapSizes.__dataclass_fields__)
    for k, v in m.items():
        need(
            k in known,
            ("maps", k),
            f"maps: unknown map size {k!r} (known: {', '.join(sorted(known))})",
        )
        need(isinstance(v, int) and v > 0, ("maps", k), f"maps.{k} must be a positive number")
    sizes = MapSizes(**m)
    try:
        sizes.cflags()
    except DabbaError as e:
        raise _err(path, _find(root, "maps", "ring_pages"), str(e)) from None

    keep = (doc.get("flows") or {}).get("keep_closed", DEFAULT_KEEP_CLOSED)
    need(
        isinstance(keep, int) and keep >= 0,
        ("flows", "keep_closed"),
        "flows.keep_closed must be >= 0",
    )

    workloads = []
    names = set()
    for i, w in enumerate(doc.get("workloads") or []):
        need(isinstance(w, dict), ("workloads", i), "each workload must be a mapping")
        for k in w:
            need(
                k in _WL,
                ("workloads", i, k),
                f"workload: unknown field {k!r} (known: {', '.join(sorted(_WL))})",
            )
        for k in ("name", "cgroup"):
            need(k in w, ("workloads", i), f"workload needs {k!r}")
        key = (w.get("namespace", "default"), w["name"])
        need(key not in names, ("workloads", i), f"workload {key[0]}/{key[1]} is listed twice")
        names.add(key)
        need(
            os.path.isabs(str(w["cgroup"])),
            ("workloads", i, "cgroup"),
            "workload cgroup must be an absolute path",
        )
        workloads.append(
            WorkloadConfig(
                name=str(w["name"]),
                cgroup=str(w["cgroup"]),
                namespace=str(w.get("namespace", "default")),
                service_account=str(w.get("service_account", "default")),
                ip=str(w.get("ip", "")),
                capture=bool(w.get("capture", True)),
                strict=bool(w.get("strict", False)),
                labels={str(k): str(v) for k, v in (w.get("labels") or {}).items()},
            )
        )
    control = None
    if doc.get("control") is not None:
        ctl = doc["control"]
        need(isinstance(ctl, dict), ("control",), "control must be a mapping")
        for k in ctl:
            need(
                k in _CONTROL,
                ("control", k),
                f"control: unknown field {k!r} (known: {', '.join(sorted(_CONTROL))})",
            )
        for k in sorted(_CONTROL):
            need(k in ctl and str(ctl[k]), ("control",), f"control.{k} is required")
        for k in ("address", "join_address"):
            need(
                ":" in str(ctl[k]), ("control", k), f"control.{k} must be HOST:PORT, not {ctl[k]!r}"
            )
        control = ControlLink(**{k: str(ctl[k]) for k in _CONTROL})
    return AgentConfig(
        control=control,
        node=doc["node"],
        cgroup=doc["cgroup"],
        tunnel=tunnel,
        bpffs=str(doc.get("bpffs", DEFAULT_BPFFS)),
        pin_name=str(doc.get("pin_name", "")),
        state_dir=str(doc.get("state_dir", "")),
        tunnel_addresses=tun_addrs,
        capture=cap,
        services=services,
        maps=sizes,
        keep_closed=keep,
        workloads=workloads,
        source=path,
    )


def load(path: str) -> AgentConfig:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise DabbaError(f"cannot read agent config {path}: {e.strerror}") from None
    return parse(text, path)
