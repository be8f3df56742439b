"""What the registry holds: workloads, services, and Istio's two security kinds (L4 fields).

These are plain data, shared by the control plane (which parses and
distributes them) and the tunnel (which enforces them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..spiffe import spiffe_id

# Policies in the root namespace apply mesh-wide. Istio's default (meshConfig.rootNamespace),
# so that a cluster's existing mesh-wide AuthorizationPolicy and PeerAuthentication keep their
# meaning; the control plane's --root-namespace changes it and tells the nodes (Snapshot).
ROOT_NAMESPACE = "istio-system"
LEGACY_ROOT_NAMESPACE = "dabba-system"  # the root before; what a snapshot without one means

# Istio AuthorizationPolicy fields the tunnel can evaluate at L4 ...
L4_SOURCE = {
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
}
L4_OPERATION = {"ports", "notPorts"}
L4_CONDITION_KEYS = {
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
}
# ... and the ones that need L7 (a waypoint in Istio's ambient mode).
L7_SOURCE = {"requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks"}
L7_OPERATION = {"hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"}


# Istio's ambient opt-in to a waypoint (on a Service or a Namespace), and the namespace of the
# waypoint when it is not the service's own
USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
# the label Istio puts on a waypoint's pods: which Gateway they serve
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
WAYPOINT_REFUSAL = (
    "connections to the service are refused rather than carried without its L7 routing and "
    "policies (remove the label, or set it to none, to carry them at L4)"
)


def waypoint_refusal(service: str, waypoint: str, why: str = "") -> str:
    """Why a connection to a service that opted into a waypoint was refused: why the waypoint
    cannot serve it (no Gateway defines it, none of its pods runs)."""
    why = why or "no Gateway (class istio-waypoint) defines it"
    return (
        f"service {service} opts into waypoint {waypoint} ({USE_WAYPOINT}) and {why}: "
        f"{WAYPOINT_REFUSAL}"
    )


def in_scope(namespace: str, selector: dict[str, str] | None, w: Workload, root: str) -> bool:
    """Istio's policy scope: the root namespace is mesh-wide, any other its own namespace;
    a selector narrows it to the workloads carrying all its labels."""
    if namespace != root and namespace != w.namespace:
        return False
    return selector is None or all(w.labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True)
class Workload:
    """A workload (pod) and where it runs."""

    name: str
    namespace: str
    service_account: str
    node: str
    ip: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    cgroup: str = ""  # its cgroup v2 folder on the node, when the registry knows it
    netns: str = ""  # its network namespace (a path on the node), when the registry knows it
    pod_uid: str = ""  # a Kubernetes pod's UID (the node finds cgroup and netns by it)
    ip6: str = ""  # its IPv6 address on a dual-stack network ("" when it has none)

    def spiffe(self, trust_domain: str) -> str:
        return spiffe_id(trust_domain, self.namespace, self.service_account)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int
    name: str = ""


@dataclass(frozen=True)
class Service:
    """A virtual IP; its endpoints are the workloads its selector picks."""

    name: str
    namespace: str
    vip: str
    ports: tuple[ServicePort, ...]
    selector: dict[str, str] = field(default_factory=dict, hash=False)
    lb_policy: str = "round_robin"  # round_robin | least_connections | random
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    origin: str = ""  # file:line (or k8s:Service/namespace/name)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, w: Workload) -> bool:
        return (
            w.namespace == self.namespace
            and bool(self.selector)
            and all(w.labels.get(k) == v for k, v in self.selector.items())
        )


@dataclass(frozen=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    # L7: enforced by waypoints only (agent/control/xds/rbac.py)
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    """One rule: all of from, to and when must match (each a list of alternatives).

    l7_fields names fields that need L7. Such a rule fails safe, as in Istio's
    ambient mode: in an ALLOW policy it never matches, in a DENY policy it
    always matches.
    """

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[Condition, ...] = ()
    l7_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuthorizationPolicy:
    """security.istio.io/v1 AuthorizationPolicy, L4 subset."""

    name: str
    namespace: str
    action: str  # ALLOW | DENY | AUDIT
    selector: dict[str, str] | None = field(
        default=None, hash=False
    )  # None: every workload in scope
    rules: tuple[Rule, ...] = ()  # empty: ALLOW matches nothing, DENY matches nothing (Istio)
    origin: str = ""  # file:line
    root: str = ROOT_NAMESPACE  # the mesh's root namespace (its policies are mesh-wide)
    # targetRefs: (kind, name) of Gateways (waypoints) and Services in its namespace; such a
    # policy is enforced by the waypoints (Istio's ambient mode), not by the tunnels
    target_refs: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def applies_to(self, w: Workload) -> bool:
        if self.target_refs:
            return False  # the waypoint's (a Service's without one: State.place_targeted)
        return in_scope(self.namespace, self.selector, w, self.root)


@dataclass(frozen=True)
class PeerAuthentication:
    """security.istio.io/v1 PeerAuthentication: mtls mode, per workload and per port."""

    name: str
    namespace: str
    mode: str  # STRICT | PERMISSIVE | DISABLE | UNSET
    selector: dict[str, str] | None = field(default=None, hash=False)
    port_modes: dict[int, str] = field(default_factory=dict, hash=False)
    origin: str = ""
    root: str = ROOT_NAMESPACE

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def applies_to(self, w: Workload) -> bool:
        return in_scope(self.namespace, self.selector, w, self.root)


@dataclass
class State:
    """One consistent registry state, with its version."""

    version: int = 0
    workloads: dict[str, Workload] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    authz: dict[str, AuthorizationPolicy] = field(default_factory=dict)
    peerauth: dict[str, PeerAuthentication] = field(default_factory=dict)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> labels
    # L7 routing (agent/control/routing.py), served by waypoints
    waypoints: dict = field(default_factory=dict)  # namespace/name -> routing.Waypoint
    virtual_services: dict = field(default_factory=dict)
    http_routes: dict = field(default_factory=dict)  # Gateway API, read as VirtualServices
    destination_rules: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def waypoint_of(self, svc: Service) -> str:
        """The waypoint (namespace/name) the service's traffic is to pass through, as Istio's
        ambient mode reads ``istio.io/use-waypoint``: the Service's own label, else its
        namespace's; the value ``none`` opts a Service out of its namespace's waypoint."""
        name = svc.labels.get(USE_WAYPOINT)
        if name is None:
            name = self.namespaces.get(svc.namespace, {}).get(USE_WAYPOINT)
        if not name or name == "none":
            return ""
        ns = svc.labels.get(USE_WAYPOINT_NAMESPACE) or svc.namespace
        return f"{ns}/{name}"

    def routes(self) -> list:
        """Every VirtualService and HTTPRoute (routing.VirtualService)."""
        return [*self.virtual_services.values(), *self.http_routes.values()]

    def waypoint_pods(self, key: str) -> list[Workload]:
        """The pods of waypoint key (namespace/name): its namespace's workloads labelled with
        its name, as Istio labels a waypoint's pods."""
        ns, _, name = key.partition("/")
        return sorted(
            (
                w
                for w in self.workloads.values()
                if w.namespace == ns
                and w.labels.get(GATEWAY_NAME_LABEL) == name
                and w.service_account == name
            ),
            key=lambda w: w.key,
        )

    def waypoint_of_pod(self, w: Workload) -> str:
        """The waypoint w is a pod of (namespace/name), or "": it must carry the Gateway's name
        (GATEWAY_NAME_LABEL), in the Gateway's namespace, and run as the service account named
        after it (its identity is the waypoint's). A label alone takes no pod out of capture."""
        name = w.labels.get(GATEWAY_NAME_LABEL)
        key = f"{w.namespace}/{name}"
        if name and key in self.waypoints and w.service_account == name:
            return key
        return ""

    def waypoint_serving(self, key: str) -> tuple[list[Workload], str]:
        """The pods of waypoint key that can serve, and why none can ("" when some can)."""
        if key not in self.waypoints:
            return [], ""  # waypoint_refusal's default: no Gateway defines it
        pods = self.waypoint_pods(key)
        if not pods:
            return [], f"no pod of it is in the registry (label {GATEWAY_NAME_LABEL})"
        return pods, ""

    def warn_waypoints(self) -> None:
        """Say, once per state, which services opted into a waypoint that cannot serve them
        (their connections are refused rather than carried without their L7 rules)."""
        for svc in sorted(self.services.values(), key=lambda s: s.key):
            wp = self.waypoint_of(svc)
            if not wp:
                continue
            pods, why = self.waypoint_serving(wp)
            if not pods:
                self.warnings.append(
                    f"{svc.origin or svc.key}: {waypoint_refusal(svc.key, wp, why)}"
                )

    def place_targeted(self) -> None:
        """Policies with targetRefs are the waypoints'. One naming a Service that no waypoint
        serves is enforced by the tunnels at that Service's pods instead (its L7 rules fail
        safe there, as any L7 rule without a waypoint): never silently nowhere."""
        import dataclasses

        for key, p in list(self.authz.items()):
            for kind, name in p.target_refs:
                where = f"{p.origin or key}: AuthorizationPolicy {key} targets {kind} {p.namespace}/{name}"
                if kind == "Gateway":
                    if f"{p.namespace}/{name}" not in self.waypoints:
                        self.warnings.append(
                            f"{where}, which no Gateway defines: it protects nothing"
                        )
                    continue
                svc = self.services.get(f"{p.namespace}/{name}")
                if svc is None:
                    self.warnings.append(f"{where}, which is no service: it protects nothing")
                    continue
                if self.waypoint_of(svc) in self.waypoints:
                    continue
                self.authz[f"{key}@{name}"] = dataclasses.replace(
                    p, selector=dict(svc.selector), target_refs=()
                )
                self.warnings.append(
                    f"{where}, which no waypoint serves: the tunnels enforce it at its pods "
                    "(its L7 rules fail safe there)"
                )

    def rooted(self, root: str) -> State:
        """This state with root as the mesh's root namespace (every policy told)."""
        import dataclasses

        self.authz = {k: dataclasses.replace(p, root=root) for k, p in self.authz.items()}
        self.peerauth = {k: dataclasses.replace(p, root=root) for k, p in self.peerauth.items()}
        return self

    def workloads_on(self, node: str) -> list[Workload]:
        return [w for w in self.workloads.values() if w.node == node]

    def endpoints(self, svc: Service) -> list[Workload]:
        return [w for w in self.workloads.values() if svc.selects(w)]

    def peer_mode(self, w: Workload, port: int | None = None) -> str:
        """Effective mTLS mode: workload policy, then namespace, then mesh-wide; default PERMISSIVE."""

        def scope(p: PeerAuthentication) -> int:
            if p.selector is not None:
                return 0
            return 1 if p.namespace == w.namespace else 2

        for p in sorted((p for p in self.peerauth.values() if p.applies_to(w)), key=scope):
            if port is not None and port in p.port_modes and p.port_modes[port] != "UNSET":
                return p.port_modes[port]
            if p.mode != "UNSET":
                return p.mode
        return "PERMISSIVE"


def mtls_mode(w, port: int) -> str:
    """A distributed workload's (pb.Workload) PeerAuthentication mode on one of its ports:
    its portLevelMtls mode for that port, else its own."""
    return w.port_mtls.get(port) or w.mtls_mode


def plaintext_ports(w) -> bool:
    """Whether a distributed workload takes plaintext (PERMISSIVE or DISABLE) on some port."""
    return w.mtls_mode != "STRICT" or any(m != "STRICT" for m in w.port_mtls.values())
