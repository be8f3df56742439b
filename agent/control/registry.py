"""The file registry: a directory of YAML documents, parsed strictly and hot-reloaded.

Kinds (several documents per file, separated by ``---``)::

    apiVersion: dabbawala.io/v1
    kind: Workload
    metadata: {name: web-1, namespace: shop, labels: {app: web}}
    spec: {serviceAccount: web, node: n1, ip: 10.20.1.11,
           cgroup: /sys/fs/cgroup/unified/kubepods/web-1}   # optional: where its processes run

    apiVersion: dabbawala.io/v1
    kind: Service
    metadata: {name: web, namespace: shop}
    spec: {vip: 10.96.0.10, ports: [{port: 80, targetPort: 8080}], selector: {app: web},
           lbPolicy: round_robin}

and Istio's own ``security.istio.io/v1`` (or ``v1beta1``) ``AuthorizationPolicy``
and ``PeerAuthentication``, L4 fields; a policy in the root namespace
(``istio-system``, as Istio's ``meshConfig.rootNamespace``; the control plane's
``--root-namespace``) is mesh-wide.

A document that is invalid is rejected with file, line and reason, and the
whole reload with it: the last good state stays in force.
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from collections.abc import Callable

import yaml

from .. import log
from . import model as m
from . import routing, validate
from .doc import (  # noqa: F401 (RegistryError and UnsupportedError are this module's API too)
    RegistryError,
    UnsupportedError,
    _Doc,
    _list,
    _meta,
    _only,
    _port,
    _spec,
    _str,
    _str_map,
)

_log = log.get("registry")

OUR_API = "dabbawala.io/v1"
ISTIO_APIS = ("security.istio.io/v1", "security.istio.io/v1beta1")
KINDS = {
    "Workload": (OUR_API,),
    "Service": (OUR_API,),
    "AuthorizationPolicy": ISTIO_APIS,
    "PeerAuthentication": ISTIO_APIS,
    "Namespace": ("v1",),  # its labels only (istio.io/use-waypoint)
    "Gateway": routing.GATEWAY_API,  # class istio-waypoint: a waypoint
    "VirtualService": routing.NETWORKING_API,
    "DestinationRule": routing.NETWORKING_API,
    "HTTPRoute": routing.GATEWAY_API,  # a Service parentRef: routed at its waypoint
}
LB_POLICIES = ("round_robin", "least_connections", "random")
MTLS_MODES = ("STRICT", "PERMISSIVE", "DISABLE", "UNSET")
ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
MAX_FILE_BYTES = 1 << 20  # a registry file larger than this is refused, unread


# Istio source fields (AuthorizationPolicy) that are valid there and not supported here
UNSUPPORTED_SOURCE = {"serviceAccounts", "notServiceAccounts"}


def parse_workload(doc: _Doc) -> m.Workload:
    name, ns, labels = _meta(doc)
    s = _spec(doc)
    _only(
        doc,
        s,
        {"serviceAccount", "node", "ip", "ip6", "cgroup", "netns"},
        ("spec",),
        "Workload spec",
    )
    for k in ("node", "ip"):
        if not s.get(k):
            doc.fail(("spec",), f"Workload {ns}/{name}: spec.{k} is required")
        _str(doc, s[k], ("spec", k), f"Workload {ns}/{name}: spec.{k}")
    err = validate.node_error(s["node"])
    if err:
        doc.fail(("spec", "node"), f"Workload {ns}/{name}: spec.{err}")
    try:
        ipaddress.IPv4Address(s["ip"])
    except ValueError:
        doc.fail(
            ("spec", "ip"), f"Workload {ns}/{name}: spec.ip {s['ip']!r} is not an IPv4 address"
        )
    ip6 = _str(doc, s.get("ip6"), ("spec", "ip6"), f"Workload {ns}/{name}: spec.ip6", "")
    if ip6:
        err = _ip6_error(ip6)
        if err:
            doc.fail(("spec", "ip6"), f"Workload {ns}/{name}: spec.ip6 {ip6!r} {err}")
        ip6 = str(ipaddress.IPv6Address(ip6))
    paths = {}
    for k in ("cgroup", "netns"):
        v = paths[k] = _str(doc, s.get(k), ("spec", k), f"Workload {ns}/{name}: spec.{k}", "")
        if v and (not v.startswith("/") or "\0" in v):
            doc.fail(("spec", k), f"Workload {ns}/{name}: spec.{k} must be an absolute path")
    sa = s.get("serviceAccount", "default")
    err = validate.name_error(sa, "spec.serviceAccount")
    if err:
        doc.fail(("spec", "serviceAccount"), f"Workload {ns}/{name}: {err}")
    return m.Workload(
        name, ns, sa, s["node"], s["ip"], labels, paths["cgroup"], paths["netns"], ip6=ip6
    )


def _ip6_error(text: str) -> str:
    """Why text cannot be a workload's IPv6 address; "" when it can."""
    try:
        a = ipaddress.IPv6Address(text)
    except ValueError:
        return "is not an IPv6 address"
    if a.ipv4_mapped is not None or a.is_link_local or a.is_loopback or a.is_unspecified:
        return "is not a routable IPv6 address (IPv4-mapped, link-local, loopback, unspecified)"
    if a.is_multicast:
        return "is a multicast address"
    return ""


def parse_namespace(doc: _Doc) -> tuple[str, dict[str, str]]:
    md = doc.value.get("metadata")
    if not isinstance(md, dict) or not md.get("name"):
        doc.fail(("metadata",), "metadata.name is required")
    _only(doc, md, {"name", "labels", "annotations"}, ("metadata",), "Namespace metadata")
    if doc.value.get("spec") not in (None, {}):
        doc.fail(("spec",), "a Namespace takes metadata (name, labels) only here")
    err = validate.namespace_error(md["name"])
    if err:
        doc.fail(("metadata", "name"), f"metadata.{err}")
    return md["name"], _str_map(doc, md.get("labels"), ("metadata", "labels"), "metadata.labels")


def parse_service(doc: _Doc) -> m.Service:
    name, ns, labels = _meta(doc)
    s = _spec(doc)
    _only(doc, s, {"vip", "ports", "selector", "lbPolicy"}, ("spec",), "Service spec")
    try:
        ipaddress.IPv4Address(str(s.get("vip")))
    except ValueError:
        doc.fail(
            ("spec", "vip"),
            f"Service {ns}/{name}: spec.vip {s.get('vip')!r} is not an IPv4 address",
        )
    ports = []
    for i, p in enumerate(_list(doc, s.get("ports"), ("spec", "ports"), "spec.ports")):
        if isinstance(p, int):
            p = {"port": p}
        if not isinstance(p, dict):
            doc.fail(("spec", "ports", i), "each port must be a number or {port, targetPort, name}")
        _only(doc, p, {"port", "targetPort", "name"}, ("spec", "ports", i), "Service port")
        port = _port(doc, p.get("port"), ("spec", "ports", i), "port")
        ports.append(
            m.ServicePort(
                port,
                _port(doc, p.get("targetPort", port), ("spec", "ports", i), "targetPort"),
                _str(doc, p.get("name"), ("spec", "ports", i, "name"), "port name", ""),
            )
        )
    if not ports:
        doc.fail(("spec",), f"Service {ns}/{name}: spec.ports needs at least one port")
    lb = s.get("lbPolicy", "round_robin")
    if lb not in LB_POLICIES:
        doc.fail(
            ("spec", "lbPolicy"),
            f"Service {ns}/{name}: lbPolicy {lb!r:.40} is not one of {', '.join(LB_POLICIES)}",
        )
    return m.Service(
        name,
        ns,
        str(s["vip"]),
        tuple(ports),
        _str_map(doc, s.get("selector"), ("spec", "selector"), "spec.selector"),
        lb,
        labels,
        doc.at(),
    )


def _selector(doc: _Doc, s: dict) -> dict[str, str] | None:
    sel = s.get("selector")
    if sel is None:
        return None
    if not isinstance(sel, dict):
        doc.fail(("spec", "selector"), "spec.selector must be {matchLabels: {...}}")
    _only(doc, sel, {"matchLabels"}, ("spec", "selector"), "selector")
    return _str_map(doc, sel.get("matchLabels"), ("spec", "selector", "matchLabels"), "matchLabels")


def _cidrs(doc: _Doc, vals, keys) -> tuple[str, ...]:
    out = []
    for i, v in enumerate(_list(doc, vals, keys, keys[-1])):
        try:
            out.append(str(ipaddress.ip_network(str(v), strict=False)))
        except ValueError:
            doc.fail((*keys, i), f"{keys[-1]}: {v!r} is not an IP address or CIDR")
    return tuple(out)


def _strs(doc: _Doc, vals, keys) -> tuple[str, ...]:
    return tuple(
        _str(doc, v, (*keys, i), keys[-1]) for i, v in enumerate(_list(doc, vals, keys, keys[-1]))
    )


def parse_authz(doc: _Doc, warn: Callable[[str], None]) -> m.AuthorizationPolicy:
    name, ns, _ = _meta(doc)
    s = _spec(doc)
    _only(
        doc,
        s,
        {"selector", "action", "rules", "provider", "targetRef", "targetRefs"},
        ("spec",),
        "AuthorizationPolicy spec",
    )
    action = s.get("action", "ALLOW")
    if action not in ACTIONS:
        doc.fail(("spec", "action"), f"action {action!r:.40} is not one of {', '.join(ACTIONS)}")
    if action == "CUSTOM":
        doc.unsupported(
            ("spec", "action"), "action CUSTOM (external authorization) is not supported at L4"
        )
    refs = _target_refs(doc, s)
    rules = []
    for i, r in enumerate(_list(doc, s.get("rules"), ("spec", "rules"), "spec.rules")):
        rk = ("spec", "rules", i)
        if not isinstance(r, dict):
            doc.fail(rk, "each rule must be a mapping of from, to, when")
        _only(doc, r, {"from", "to", "when"}, rk, "rule")
        l7: list[str] = []
        sources, operations, conditions = [], [], []
        for j, f in enumerate(_list(doc, r.get("from"), (*rk, "from"), "from")):
            src = (f or {}).get("source") if isinstance(f, dict) else None
            if not isinstance(src, dict):
                doc.fail((*rk, "from", j), "each from entry needs a source mapping")
            sk = (*rk, "from", j, "source")
            for k in sorted(UNSUPPORTED_SOURCE & set(src)):
                doc.unsupported((*sk, k), f"source.{k} is not supported here")
            _only(doc, src, m.L4_SOURCE | m.L7_SOURCE, sk, "source")
            l7 += [f"from.source.{k}" for k in src if k in m.L7_SOURCE]
            sources.append(
                m.Source(
                    principals=_strs(doc, src.get("principals"), (*sk, "principals")),
                    not_principals=_strs(doc, src.get("notPrincipals"), (*sk, "notPrincipals")),
                    namespaces=_strs(doc, src.get("namespaces"), (*sk, "namespaces")),
                    not_namespaces=_strs(doc, src.get("notNamespaces"), (*sk, "notNamespaces")),
                    ip_blocks=_cidrs(doc, src.get("ipBlocks"), (*sk, "ipBlocks")),
                    not_ip_blocks=_cidrs(doc, src.get("notIpBlocks"), (*sk, "notIpBlocks")),
                )
            )
        for j, t in enumerate(_list(doc, r.get("to"), (*rk, "to"), "to")):
            op = (t or {}).get("operation") if isinstance(t, dict) else None
            if not isinstance(op, dict):
                doc.fail((*rk, "to", j), "each to entry needs an operation mapping")
            ok = (*rk, "to", j, "operation")
            _only(doc, op, m.L4_OPERATION | m.L7_OPERATION, ok, "operation")
            l7 += [f"to.operation.{k}" for k in op if k in m.L7_OPERATION]
            operations.append(
                m.Operation(
                    ports=tuple(
                        _port(doc, p, (*ok, "ports"), "ports")
                        for p in _list(doc, op.get("ports"), (*ok, "ports"), "ports")
                    ),
                    not_ports=tuple(
                        _port(doc, p, (*ok, "notPorts"), "notPorts")
                        for p in _list(doc, op.get("notPorts"), (*ok, "notPorts"), "notPorts")
                    ),
                    **{
                        f: _strs(doc, op.get(k), (*ok, k))
                        for f, k in (
                            ("methods", "methods"),
                            ("not_methods", "notMethods"),
                            ("paths", "paths"),
                            ("not_paths", "notPaths"),
                            ("hosts", "hosts"),
                            ("not_hosts", "notHosts"),
                        )
                    },
                )
            )
        for j, c in enumerate(_list(doc, r.get("when"), (*rk, "when"), "when")):
            ck = (*rk, "when", j)
            if not isinstance(c, dict) or "key" not in c:
                doc.fail(ck, "each when entry needs a key")
            _only(doc, c, {"key", "values", "notValues"}, ck, "condition")
            key = _str(doc, c["key"], (*ck, "key"), "when.key")
            if key not in m.L4_CONDITION_KEYS:
                l7.append(f"when.key={key}")
            conditions.append(
                m.Condition(
                    key,
                    _strs(doc, c.get("values"), (*ck, "values")),
                    _strs(doc, c.get("notValues"), (*ck, "notValues")),
                )
            )
        if l7 and not refs:  # (with targetRefs a waypoint enforces them)
            effect = (
                "never matches (ALLOW)" if action == "ALLOW" else "matches every connection (DENY)"
            )
            warn(
                f"{doc.at(*rk)}: AuthorizationPolicy {ns}/{name} rule {i} uses L7 field(s) {', '.join(l7)}; "
                f"at L4 the rule fails safe and {effect}"
            )
        rules.append(m.Rule(tuple(sources), tuple(operations), tuple(conditions), tuple(l7)))
    return m.AuthorizationPolicy(
        name, ns, action, _selector(doc, s), tuple(rules), doc.at(), target_refs=refs
    )


def _target_refs(doc: _Doc, s: dict) -> tuple[tuple[str, str], ...]:
    """targetRefs (or the older targetRef): Gateways (waypoints) and Services of the policy's
    namespace, as Istio's ambient mode attaches policies to waypoints."""
    if "targetRef" in s and "targetRefs" in s:
        doc.fail(("spec", "targetRef"), "write targetRefs or targetRef, not both")
    raw = (
        [s["targetRef"]]
        if "targetRef" in s
        else _list(doc, s.get("targetRefs"), ("spec", "targetRefs"), "targetRefs")
    )
    key = "targetRef" if "targetRef" in s else "targetRefs"
    if raw and s.get("selector") is not None:
        doc.fail(("spec", key), "a policy takes a selector or targetRefs, not both")
    out = []
    for i, ref in enumerate(raw):
        at = ("spec", key) if key == "targetRef" else ("spec", key, i)
        if not isinstance(ref, dict):
            doc.fail(at, "a target reference is a mapping of group, kind and name")
        _only(doc, ref, {"group", "kind", "name", "namespace"}, at, "target reference")
        kind = ref.get("kind")
        group = ref.get("group", "")
        if (kind, group) not in (("Gateway", "gateway.networking.k8s.io"), ("Service", "")):
            doc.fail(at, f"target kind {kind!r} (group {group!r}) is not served here: a Gateway "
                         "(gateway.networking.k8s.io) or a Service (group \"\")")  # fmt: skip
        if ref.get("namespace") not in (None, doc.value["metadata"].get("namespace", "default")):
            doc.fail(at, "a target reference names an object of the policy's own namespace")
        err = validate.name_error(ref.get("name"), "name")
        if err:
            doc.fail(at, f"target reference: {err}")
        out.append((kind, ref["name"]))
    return tuple(out)


def parse_peerauth(doc: _Doc) -> m.PeerAuthentication:
    name, ns, _ = _meta(doc)
    s = _spec(doc)
    _only(doc, s, {"selector", "mtls", "portLevelMtls"}, ("spec",), "PeerAuthentication spec")
    mtls = s.get("mtls") or {}
    if not isinstance(mtls, dict):
        doc.fail(("spec", "mtls"), "mtls must be {mode: ...}")
    _only(doc, mtls, {"mode"}, ("spec", "mtls"), "mtls")
    mode = mtls.get("mode") or "UNSET"
    if mode not in MTLS_MODES:
        doc.fail(
            ("spec", "mtls", "mode"),
            f"mtls.mode {mode!r:.40} is not one of {', '.join(MTLS_MODES)}",
        )
    ports = {}
    plm = s.get("portLevelMtls") or {}
    if not isinstance(plm, dict):
        doc.fail(("spec", "portLevelMtls"), "portLevelMtls must map ports to {mode: ...}")
    for p, v in plm.items():
        pm = (v or {}).get("mode", "UNSET") if isinstance(v, dict) else "?"
        if pm not in MTLS_MODES:
            doc.fail(
                ("spec", "portLevelMtls", p),
                f"portLevelMtls {p!r:.20}: mode {pm!r:.40} is not one of {', '.join(MTLS_MODES)}",
            )
        ports[_port(doc, p, ("spec", "portLevelMtls", p), "portLevelMtls")] = pm
    return m.PeerAuthentication(name, ns, mode, _selector(doc, s), ports, doc.at())


def parse_text(text: str, path: str, state: m.State, warn: Callable[[str], None]) -> None:
    """Parse every document of one file into state; raises RegistryError on the first bad one.

    YAML aliases are refused (a few hundred bytes of them expand to gigabytes: the "billion
    laughs"), and so is a file over MAX_FILE_BYTES.
    """
    if len(text) > MAX_FILE_BYTES:
        raise RegistryError(
            f"{path}:1: {len(text)} bytes; a registry file may hold {MAX_FILE_BYTES} at most"
        )
    try:
        for ev in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(ev, yaml.AliasEvent) or getattr(ev, "anchor", None):
                raise RegistryError(
                    f"{path}:{ev.start_mark.line + 1}: YAML anchors and aliases are not accepted "
                    "(write the value out)"
                )
        nodes = list(yaml.compose_all(text))
        values = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise RegistryError(
            f"{path}:{mark.line + 1 if mark else 1}: not valid YAML: "
            f"{getattr(e, 'problem', None) or e}"
        ) from None
    for node, value in zip(nodes, values, strict=True):
        if value is None:
            continue
        doc = _Doc(path, node, value)
        if not isinstance(value, dict):
            doc.fail((), "a document must be a mapping with apiVersion, kind, metadata, spec")
        kind, api = value.get("kind"), value.get("apiVersion")
        if not isinstance(kind, str) or kind not in KINDS:
            doc.fail(("kind",), f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
        if not isinstance(api, str) or api not in KINDS[kind]:
            doc.fail(
                ("apiVersion",), f"{kind} needs apiVersion {' or '.join(KINDS[kind])}, not {api!r}"
            )
        _only(doc, value, {"apiVersion", "kind", "metadata", "spec"}, (), kind)
        if kind == "Namespace":
            name, labels = parse_namespace(doc)
            if name in state.namespaces:
                doc.fail(("metadata", "name"), f"Namespace {name} is defined twice")
            state.namespaces[name] = labels
            continue
        try:
            if kind == "Gateway":
                obj, table = routing.parse_gateway(doc), state.waypoints
            elif kind == "VirtualService":
                obj, table = routing.parse_virtual_service(doc), state.virtual_services
            elif kind == "HTTPRoute":
                obj, table = routing.parse_http_route(doc), state.http_routes
            elif kind == "DestinationRule":
                obj, table = routing.parse_destination_rule(doc), state.destination_rules
            elif kind == "Workload":
                obj, table = parse_workload(doc), state.workloads
            elif kind == "Service":
                obj, table = parse_service(doc), state.services
            elif kind == "AuthorizationPolicy":
                obj, table = parse_authz(doc, warn), state.authz
            else:
                obj, table = parse_peerauth(doc), state.peerauth
        except UnsupportedError as e:
            # valid for Istio, not for us: this object alone is refused, and fails closed
            obj = fail_closed(kind, value, str(e), doc.at())
            if obj is None:
                raise
            table = state.authz if kind == "AuthorizationPolicy" else state.peerauth
            warn(f"{e}; {kind} {obj.key} refused on its own: {FAIL_CLOSED[kind]} (fail closed)")
        if obj.key in table:
            doc.fail(("metadata", "name"), f"{kind} {obj.key} is defined twice")
        table[obj.key] = obj
    _check_ips(state)


FAIL_CLOSED = {
    "AuthorizationPolicy": "every connection to what it selects is denied",
    "PeerAuthentication": "what it selects is STRICT",
}


def fail_closed(kind: str, obj: dict, why: str, origin: str):
    """What stands for an Istio object we cannot honour: DENY everything it selects
    (AuthorizationPolicy) or STRICT (PeerAuthentication); None when it names no namespace we
    could place it in (then it can select no workload either) or is of another kind."""
    if kind not in FAIL_CLOSED:
        return None
    md = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    name, ns = md.get("name"), md.get("namespace", "default")
    if validate.name_error(name) or validate.namespace_error(ns):
        return None
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    sel = spec.get("selector")
    labels = sel.get("matchLabels") if isinstance(sel, dict) else None
    if not isinstance(labels, dict) or any(validate.label_error(k, v) for k, v in labels.items()):
        labels = None  # no selector we can read: the whole namespace (closed, not open)
    if kind == "AuthorizationPolicy":
        rule = m.Rule(l7_fields=(f"refused by the control plane: {why}",))
        return m.AuthorizationPolicy(name, ns, "DENY", labels, (rule,), origin)
    return m.PeerAuthentication(name, ns, "STRICT", labels, {}, origin)


def check_routing(state: m.State) -> None:
    """The routing documents against the rest of the state; raises RegistryError."""
    try:
        routing.check(state)
    except routing.RoutingError as e:
        raise RegistryError(str(e)) from None


def _check_ips(state: m.State) -> None:
    seen: dict[str, str] = {}
    for w in state.workloads.values():
        for ip in filter(None, (w.ip, w.ip6)):
            if ip in seen:
                raise RegistryError(f"workloads {seen[ip]} and {w.key} have the same ip {ip}")
            seen[ip] = w.key


def load_dir(path: str, root: str = m.ROOT_NAMESPACE) -> m.State:
    """Parse every *.yaml/*.yml under path (sorted); raises RegistryError.

    root: the mesh's root namespace. A policy in dabba-system, the root namespace before,
    is refused while the root is another: it would silently stop being mesh-wide.
    """
    if not os.path.isdir(path):
        raise RegistryError(f"{path}: the registry directory does not exist")
    state = m.State()
    for f in _files(path):
        with open(f) as fh:
            parse_text(fh.read(), f, state, state.warnings.append)
    check_routing(state)
    state.place_targeted()
    state.warn_waypoints()
    if root != m.LEGACY_ROOT_NAMESPACE:
        for p in [*state.authz.values(), *state.peerauth.values()]:
            if p.namespace == m.LEGACY_ROOT_NAMESPACE:
                raise RegistryError(
                    f"{p.origin}: {type(p).__name__} {p.key}: {m.LEGACY_ROOT_NAMESPACE} is no "
                    f"longer the mesh's root namespace ({root} is, as Istio's "
                    "meshConfig.rootNamespace): move the policy there to keep it mesh-wide, or "
                    f"run the control plane with --root-namespace {m.LEGACY_ROOT_NAMESPACE}"
                )
    return state.rooted(root)


def _files(path: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(path):
        out += [
            os.path.join(dirpath, f)
            for f in files
            if f.endswith((".yaml", ".yml")) and not f.startswith(".")
        ]
    return sorted(out)


def source_status(source) -> dict:
    """What a registry source (FileRegistry, kube.KubeSource) says of itself: the version in
    force and, while its changes fail, why and since when (the last good state is served)."""
    return {
        "source": "kubernetes" if type(source).__name__ == "KubeSource" else "files",
        "version": source.state.version,
        "workloads": len(source.state.workloads),
        "services": len(source.state.services),
        "policies": len(source.state.authz) + len(source.state.peerauth),
        "warnings": list(source.state.warnings),
        "last_error": source.last_error,
        "failures": source.failures,
        "failing_since": source.failing_since,
    }


class FileRegistry:
    """Watches a directory; on every valid change publishes a new State with version + 1.

    Polls modification times (every ``interval`` s): no extra dependency,
    and it sees edits on any filesystem. An invalid change is logged with
    file:line:reason and ignored; the last good state stays in force.
    """

    def __init__(
        self,
        path: str,
        on_change: Callable[[m.State], None] | None = None,
        interval: float = 0.5,
        root: str = m.ROOT_NAMESPACE,
    ):
        self.path = path
        self.on_change = on_change
        self.interval = interval
        self.root = root
        self.state = load_dir(path, root)
        self.state.version = 1
        self.last_error: str | None = None
        self.failures = 0  # changes rejected since start
        self.failing_since: float | None = None
        self._stamp = self._snapshot()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for w in self.state.warnings:
            _log.warning(w)

    def _snapshot(self):
        out = []
        for f in _files(self.path):
            try:
                st = os.stat(f)
                out.append((f, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                pass
        return out

    def poll(self) -> bool:
        """Reload if anything changed; True when a new state was published."""
        stamp = self._snapshot()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            new = load_dir(self.path, self.root)
        except RegistryError as e:
            self.last_error = str(e)
            self.failures += 1
            self.failing_since = self.failing_since or time.time()
            _log.error(f"registry change rejected, keeping version {self.state.version}: {e}")
            return False
        self.last_error, self.failing_since = None, None
        new.version = self.state.version + 1
        for w in new.warnings:
            _log.warning(w)
        self.state = new
        _log.info(
            "registry reloaded",
            fields={
                "version": new.version,
                "workloads": len(new.workloads),
                "services": len(new.services),
                "policies": len(new.authz) + len(new.peerauth),
            },
        )
        if self.on_change:
            self.on_change(new)
        return True

    def start(self) -> None:
        def loop():
            while not self._stop.wait(self.interval):
                try:
                    self.poll()
                except Exception as e:  # never let the watcher die
                    _log.error(f"registry watcher: {e}")

        self._thread = threading.Thread(target=loop, name="registry-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(2)
