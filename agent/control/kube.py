"""The Kubernetes registry source (official `kubernetes` client), in-cluster or from a kubeconfig.

What it reads, and what it becomes in the registry:

- Pods (Running, with an IP, not hostNetwork) -> Workload: name, namespace,
  labels, serviceAccountName, spec.nodeName, status.podIP;
- Services with a cluster IP -> Service: the cluster IP is the VIP, ports
  with their targetPort (a named targetPort is resolved through the
  service's EndpointSlices), the selector; ``dabbawala.io/lb-policy``
  annotation picks round_robin | least_connections | random;
- EndpointSlices -> named targetPort resolution;
- Namespaces -> their labels: ``istio.io/use-waypoint`` on a namespace (or on a
  Service, its own label) opts its services into a waypoint: their connections go
  through it, or are refused, with the reason, while it cannot serve them (model);
- security.istio.io AuthorizationPolicy and PeerAuthentication -> parsed by
  the same code as the file registry (errors name kind/namespace/name);
- gateway.networking.k8s.io Gateway (class istio-waypoint: a waypoint) and HTTPRoute,
  networking.istio.io VirtualService and DestinationRule -> the waypoints' routing
  (agent/control/routing.py), each refused on its own when it is bad (a route to no
  service, a subset no pod matches...): the routing of its service falls back to its
  service's endpoints, never to another service's.

One object never takes the others down. A pod whose names are not Kubernetes
names is left out, with a warning. An Istio object we cannot honour (action
CUSTOM, a field we do not know such as a newer Istio's ``source.serviceAccounts``,
a malformed value) is refused on its own, with its reason, and what it selects
fails closed: an AuthorizationPolicy becomes a DENY of every connection to the
workloads it selects, a PeerAuthentication makes them STRICT. A list that fails
(the API server down, throttled, forbidden) publishes nothing: the last good state
stays in force, visibly (a log line; ``dabba control status``). Only a missing
Istio CRD (404) means "no such objects".

No API server runs on the machine this was built on: translation is
tested from objects in the API's JSON shape, deserialized by the client's
own models (tests/unit/test_kube.py); the live list calls were not run.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable

import yaml

from .. import log
from ..errors import DabbaError
from . import model as m
from . import validate
from .registry import FAIL_CLOSED, RegistryError, fail_closed, parse_text

_log = log.get("kube")

LB_ANNOTATION = "dabbawala.io/lb-policy"


def _get(obj, *path, default=None):
    """Read a field from a client model or a plain dict."""
    for p in path:
        if obj is None:
            return default
        obj = obj.get(p) if isinstance(obj, dict) else getattr(obj, p, None)
    return default if obj is None else obj


def workload_error(w: m.Workload) -> str | None:
    """Why a pod's workload cannot be meshed (a name that is no Kubernetes name), or None."""
    return (
        validate.namespace_error(w.namespace)
        or validate.name_error(w.name, "pod name")
        or validate.name_error(w.service_account, "serviceAccountName")
        or validate.node_error(w.node)
        or (None if w.ip else "the pod has no IPv4 address (IPv6-only pods are not meshed yet)")
        or next((e for k, v in w.labels.items() if (e := validate.label_error(k, v))), None)
    )


def workload_of(pod) -> m.Workload | None:
    if _get(pod, "status", "phase") != "Running" or not _get(pod, "status", "pod_ip"):
        return None
    if _get(pod, "spec", "host_network"):
        return None  # host-network pods share the node's identity and are not enrolled
    ip, ip6 = pod_addresses(pod)
    return m.Workload(
        name=_get(pod, "metadata", "name"),
        namespace=_get(pod, "metadata", "namespace", default="default"),
        service_account=_get(pod, "spec", "service_account_name", default="default"),
        node=_get(pod, "spec", "node_name", default=""),
        ip=ip,
        labels=dict(_get(pod, "metadata", "labels", default={})),
        pod_uid=_get(pod, "metadata", "uid", default=""),
        ip6=ip6,
    )


def pod_addresses(pod) -> tuple[str, str]:
    """(IPv4, IPv6) of a pod: status.podIPs (dual stack, either family first), else
    status.podIP; "" for a family it has none of, or for what is no address."""
    ips = [_get(p, "ip") for p in _get(pod, "status", "pod_i_ps", default=[]) or []]
    ips.append(_get(pod, "status", "pod_ip"))
    got = {4: "", 6: ""}
    for text in ips:
        try:
            a = ipaddress.ip_address(str(text))
        except ValueError:
            continue
        got[a.version] = got[a.version] or str(a)
    return got[4], got[6]


def _named_ports(slices, service: str, namespace: str) -> dict[str, int]:
    out = {}
    for s in slices:
        if _get(s, "metadata", "namespace") != namespace:
            continue
        if _get(s, "metadata", "labels", default={}).get("kubernetes.io/service-name") != service:
            continue
        for p in _get(s, "ports", default=[]) or []:
            if _get(p, "name") and _get(p, "port"):
                out[_get(p, "name")] = int(_get(p, "port"))
    return out


def service_of(svc, slices, warn: Callable[[str], None]) -> m.Service | None:
    vip = _get(svc, "spec", "cluster_ip")
    name, ns = _get(svc, "metadata", "name"), _get(svc, "metadata", "namespace", default="default")
    if not vip or vip == "None":
        return None  # headless: no VIP to capture
    named = _named_ports(slices, name, ns)
    ports = []
    for p in _get(svc, "spec", "ports", default=[]) or []:
        if (_get(p, "protocol") or "TCP") != "TCP":
            continue
        tp = _get(p, "target_port", default=_get(p, "port"))
        if isinstance(tp, str) and not tp.isdigit():
            if tp not in named:
                warn(
                    f"Service {ns}/{name}: targetPort {tp!r} has no EndpointSlice port yet; port "
                    f"{_get(p, 'port')} skipped"
                )
                continue
            tp = named[tp]
        ports.append(m.ServicePort(int(_get(p, "port")), int(tp), _get(p, "name") or ""))
    if not ports:
        return None
    lb = (_get(svc, "metadata", "annotations", default={}) or {}).get(LB_ANNOTATION, "round_robin")
    if lb not in ("round_robin", "least_connections", "random"):
        warn(
            f"Service {ns}/{name}: annotation {LB_ANNOTATION}={lb!r} is unknown; using round_robin"
        )
        lb = "round_robin"
    return m.Service(
        name,
        ns,
        vip,
        tuple(ports),
        dict(_get(svc, "spec", "selector", default={}) or {}),
        lb,
        dict(_get(svc, "metadata", "labels", default={}) or {}),
        f"k8s:Service/{ns}/{name}",
    )


_API_OF = {"Gateway": "gateway.networking.k8s.io/v1", "HTTPRoute": "gateway.networking.k8s.io/v1",
           "VirtualService": "networking.istio.io/v1", "DestinationRule": "networking.istio.io/v1"}  # fmt: skip


def _istio_doc(obj: dict, kind: str) -> str:
    """The fields the file registry parses, as YAML (metadata trimmed; status dropped)."""
    md = obj.get("metadata", {})
    doc = {
        "apiVersion": obj.get("apiVersion") or _API_OF.get(kind, "security.istio.io/v1"),
        "kind": kind,
        "metadata": {"name": md.get("name"), "namespace": md.get("namespace", "default")},
        "spec": obj.get("spec", {}),
    }
    return yaml.safe_dump(doc, sort_keys=False)


ROUTING_KINDS = (  # (kind, group, plural), listed in every version the group serves
    ("Gateway", "gateway.networking.k8s.io", "gateways"),
    ("HTTPRoute", "gateway.networking.k8s.io", "httproutes"),
    ("VirtualService", "networking.istio.io", "virtualservices"),
    ("DestinationRule", "networking.istio.io", "destinationrules"),
)
VERSIONS = {"gateway.networking.k8s.io": ("v1", "v1beta1"),
            "networking.istio.io": ("v1", "v1beta1"),
            "security.istio.io": ("v1", "v1beta1")}  # fmt: skip


def translate(
    pods, services, slices, authz: list[dict], peerauth: list[dict], namespaces=(), routing=()
) -> m.State:
    """Kubernetes objects -> one registry State. An object we cannot honour is refused on its
    own (a warning naming it and why) and what it selects fails closed (the module docstring).
    namespaces: their labels (istio.io/use-waypoint); routing: (kind, object) of
    ROUTING_KINDS."""
    st = m.State()
    for n in namespaces:
        name = _get(n, "metadata", "name")
        if name:
            st.namespaces[name] = dict(_get(n, "metadata", "labels", default={}) or {})
    for pod in pods:
        w = workload_of(pod)
        if w:
            err = workload_error(w)
            if err:
                st.warnings.append(f"k8s:Pod/{w.namespace!r:.70}/{w.name!r:.70}: left out: {err}")
                continue
            st.workloads[w.key] = w
    for svc in services:
        s = service_of(svc, slices, st.warnings.append)
        if s:
            st.services[s.key] = s
    for kind, objs, table in (
        ("AuthorizationPolicy", authz, st.authz),
        ("PeerAuthentication", peerauth, st.peerauth),
    ):
        for o in objs:
            md = o.get("metadata") if isinstance(o.get("metadata"), dict) else {}
            where = f"k8s:{kind}/{md.get('namespace', 'default')!s:.70}/{md.get('name')!s:.70}"
            try:
                parse_text(_istio_doc(o, kind), where, st, st.warnings.append)
            except (RegistryError, yaml.YAMLError) as e:
                why = str(e).removeprefix(where).lstrip(":0123456789 ")
                sub = fail_closed(kind, o, why, where)
                if sub is None:
                    st.warnings.append(f"{e}; ignored: it names no namespace a workload can be in")
                    continue
                st.warnings.append(
                    f"{e}; refused on its own, and {FAIL_CLOSED[kind]} (fail closed)"
                )
                table[sub.key] = sub
    _routing(st, routing)
    st.place_targeted()
    st.warn_waypoints()
    return st


def _routing(st: m.State, objs) -> None:
    """Each routing object parsed alone, then checked against the rest: one that does not fit
    is dropped, saying why, and the others stay."""
    from .routing import RoutingError, check

    tables = {"Gateway": st.waypoints, "HTTPRoute": st.http_routes,
              "VirtualService": st.virtual_services, "DestinationRule": st.destination_rules}  # fmt: skip
    for kind, o in objs:
        md = o.get("metadata") if isinstance(o.get("metadata"), dict) else {}
        where = f"k8s:{kind}/{md.get('namespace', 'default')!s:.70}/{md.get('name')!s:.70}"
        try:
            parse_text(_istio_doc(o, kind), where, st, st.warnings.append)
        except (RegistryError, yaml.YAMLError) as e:
            st.warnings.append(f"{e}; refused on its own")
    for _ in range(len(objs) + 1):
        try:
            check(st)
            return
        except RoutingError as e:
            origin = str(e).split(": ", 1)[0].rsplit(":", 1)[0]
            for table in tables.values():
                for key, obj in list(table.items()):
                    if obj.origin.rsplit(":", 1)[0] == origin:
                        del table[key]
            st.warnings.append(f"{e}; refused on its own")


class KubeSource:
    """Lists the cluster every ``interval`` seconds and publishes a new State when it changed.

    Listing (rather than watching) keeps one code path for start-up and
    recovery; a failing list keeps the last good state, like the file registry.
    """

    def __init__(
        self,
        node_filter: str | None = None,
        kubeconfig: str | None = None,
        interval: float = 5.0,
        on_change: Callable[[m.State], None] | None = None,
        root: str = m.ROOT_NAMESPACE,
    ):
        try:
            from kubernetes import client, config
        except ImportError as e:
            raise DabbaError(f"the kubernetes client is not installed: {e}") from None
        try:
            if kubeconfig:
                config.load_kube_config(kubeconfig)
            else:
                config.load_incluster_config()
        except Exception as e:
            raise DabbaError(
                f"cannot reach Kubernetes: {e}",
                hint="in a pod: a ServiceAccount token is mounted; elsewhere pass --kubeconfig",
            ) from None
        self.core, self.discovery, self.custom = (
            client.CoreV1Api(),
            client.DiscoveryV1Api(),
            client.CustomObjectsApi(),
        )
        self.interval, self.on_change, self.root = interval, on_change, root
        self.last_error: str | None = None  # the last list's failure; None once one succeeds
        self.failures = 0  # lists failed since start
        self.failing_since: float | None = None
        try:
            self.state = self.load()
        except Exception as e:  # nothing good to serve yet: refuse to start, saying why
            raise DabbaError(
                f"the first list of the cluster failed: {str(e).strip().splitlines()[-1:]}",
                hint="is the API server reachable, and may this ServiceAccount list pods, "
                "services, endpointslices and Istio's security.istio.io kinds?",
            ) from None
        self.state.version = 1
        self._stop = threading.Event()

    def _istio(self, plural: str) -> list[dict]:
        """Every object of an Istio security kind. Only a missing CRD (404 for both versions)
        is "none"; any other failure raises: an empty list would drop every policy, STRICT
        would become PERMISSIVE and DENY policies would vanish mesh-wide (fail open)."""
        return self._kind("security.istio.io", plural)

    def _kind(self, group: str, plural: str) -> list[dict]:
        """Every object of a custom kind, in the first version of the group's the API serves
        (VERSIONS); only a missing CRD (404 for every version) is "none"."""
        from kubernetes.client.exceptions import ApiException

        for version in VERSIONS[group]:
            try:
                got = self.custom.list_cluster_custom_object(group, version, plural)
            except ApiException as e:
                if e.status == 404:
                    continue
                raise DabbaError(
                    f"listing {group}/{version} {plural} failed: {e.status} {e.reason}"
                ) from None
            items = got.get("items") if isinstance(got, dict) else None
            if not isinstance(items, list):
                raise DabbaError(f"listing {group}/{version} {plural}: no items list")
            return items
        return []

    def load(self) -> m.State:
        return translate(
            self.core.list_pod_for_all_namespaces().items,
            self.core.list_service_for_all_namespaces().items,
            self.discovery.list_endpoint_slice_for_all_namespaces().items,
            self._istio("authorizationpolicies"),
            self._istio("peerauthentications"),
            self.core.list_namespace().items,
            [(kind, o) for kind, group, plural in ROUTING_KINDS for o in self._kind(group, plural)],
        ).rooted(self.root)

    def start(self) -> None:
        def loop():
            while not self._stop.wait(self.interval):
                self.poll()

        threading.Thread(target=loop, name="kube-list", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def poll(self) -> bool:
        try:
            new = self.load()
        except Exception as e:  # the API server, the network, the client: keep the last good
            self.failures += 1
            self.last_error = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            self.failing_since = self.failing_since or time.time()
            _log.error(
                f"Kubernetes list failed, keeping version {self.state.version}: {self.last_error}"
            )
            return False
        self.last_error, self.failing_since = None, None
        if (new.workloads, new.services, new.authz, new.peerauth) == (
            self.state.workloads,
            self.state.services,
            self.state.authz,
            self.state.peerauth,
        ):
            return False
        new.version = self.state.version + 1
        self.state = new
        if self.on_change:
            self.on_change(new)
        return True
