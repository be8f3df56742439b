"""L7 routing documents, served by waypoints: Gateway API's ``Gateway`` (class
``istio-waypoint``), Istio's ``VirtualService`` and ``DestinationRule``.

What each becomes in a waypoint's Envoy is agent/control/xds/waypoint.py. Parsed strictly, like
every registry kind: an unknown field, a route to a host that is no service, a subset no
DestinationRule defines or no pod matches, weights that do not sum to 100 are errors with file
and line, and the last good state stays in force.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..spiffe import spiffe_id
from . import model as m
from .doc import _Doc, _list, _meta, _only, _port, _spec, _str, _str_map

GATEWAY_API = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")
"""Gateway and HTTPRoute"""
NETWORKING_API = ("networking.istio.io/v1", "networking.istio.io/v1beta1")
WAYPOINT_CLASS = "istio-waypoint"
HBONE_PORT = 15008
CLUSTER_DOMAIN = "cluster.local"
RETRY_ON = {
    "5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx", "refused-stream",
    "retriable-status-codes", "retriable-headers", "envoy-ratelimited", "http3-post-connect-failure",
    "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable",
}  # fmt: skip
LB_SIMPLE = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "LEAST_CONN", "PASSTHROUGH", "UNSPECIFIED")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(h|m|s|ms|us)$")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


@dataclass(frozen=True)
class Waypoint:
    """A Gateway of class istio-waypoint: an Envoy that serves its namespace's opted-in
    services' L7 (its pods carry model.GATEWAY_NAME_LABEL); its identity is its service account,
    named after it, as Istio's waypoints."""

    name: str
    namespace: str
    origin: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def spiffe(self, trust_domain: str) -> str:
        return spiffe_id(trust_domain, self.namespace, self.name)


@dataclass(frozen=True)
class StringMatch:
    kind: str  # exact | prefix | regex
    value: str


@dataclass(frozen=True)
class HttpMatch:
    """One HTTPMatchRequest: every field given must match."""

    uri: StringMatch | None = None
    method: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()


@dataclass(frozen=True)
class Destination:
    service: str  # namespace/name
    subset: str = ""
    port: int = 0  # 0: the port the request came to
    weight: int = 100
    origin: str = ""


@dataclass(frozen=True)
class Retries:
    attempts: int
    per_try_timeout: float | None = None
    retry_on: str = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"


@dataclass(frozen=True)
class Fault:
    abort_percent: float = 0.0
    abort_status: int = 0
    delay_percent: float = 0.0
    delay: float = 0.0


@dataclass(frozen=True)
class HttpRoute:
    name: str
    matches: tuple[HttpMatch, ...]  # empty: every request
    destinations: tuple[Destination, ...]
    timeout: float | None = None
    retries: Retries | None = None
    fault: Fault | None = None
    origin: str = ""


@dataclass(frozen=True)
class VirtualService:
    name: str
    namespace: str
    hosts: tuple[str, ...]  # the services (namespace/name) it routes
    http: tuple[HttpRoute, ...]
    origin: str = ""
    kind: str = "VirtualService"  # or HTTPRoute (Gateway API), read into the same routes

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class TrafficPolicy:
    lb: str = ""  # ROUND_ROBIN | LEAST_REQUEST | RANDOM ("": Envoy's default)
    max_connections: int | None = None
    max_pending: int | None = None  # http1MaxPendingRequests
    max_requests: int | None = None  # http2MaxRequests
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    consecutive_5xx: int | None = None  # outlierDetection
    interval: float | None = None
    base_ejection: float | None = None
    max_ejection_percent: int | None = None


@dataclass(frozen=True)
class Subset:
    name: str
    labels: dict[str, str] = field(hash=False)
    policy: TrafficPolicy | None = None


@dataclass(frozen=True)
class DestinationRule:
    name: str
    namespace: str
    service: str  # namespace/name
    subsets: tuple[Subset, ...]
    policy: TrafficPolicy | None = None
    origin: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.subsets if s.name == name), None)


# ---- parsing ---------------------------------------------------------------------------------


def duration(doc: _Doc, v, keys: tuple, what: str) -> float:
    """A protobuf duration as Istio writes it: 1s, 200ms, 1.5s, 1m."""
    t = _str(doc, v, keys, what)
    mm = _DURATION.match(t)
    if not mm:
        doc.fail(keys, f"{what}: {t!r} is not a duration (write 200ms, 1s, 1.5s, 1m)")
    return float(mm.group(1)) * _UNIT[mm.group(2)]


def _int(doc: _Doc, v, keys: tuple, what: str, lo: int = 0, hi: int = 2**31 - 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        doc.fail(keys, f"{what} must be a whole number, not {v!r:.40}")
    if not lo <= v <= hi:
        doc.fail(keys, f"{what}: {v} is out of range ({lo}..{hi})")
    return v


def _percent(doc: _Doc, v, keys: tuple, what: str) -> float:
    if isinstance(v, dict):
        _only(doc, v, {"value"}, keys, what)
        v = v.get("value")
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 100:
        doc.fail(keys, f"{what} must be a percentage from 0 to 100, not {v!r:.40}")
    return float(v)


def parse_gateway(doc: _Doc) -> Waypoint:
    name, ns, _ = _meta(doc)
    s = _spec(doc)
    _only(doc, s, {"gatewayClassName", "listeners"}, ("spec",), "Gateway spec")
    cls = _str(doc, s.get("gatewayClassName"), ("spec", "gatewayClassName"),
               "Gateway spec.gatewayClassName")  # fmt: skip
    if cls != WAYPOINT_CLASS:
        doc.fail(
            ("spec", "gatewayClassName"),
            f"Gateway {ns}/{name}: class {cls!r} is not served here (only {WAYPOINT_CLASS!r}: "
            "this mesh runs waypoints, not ingress gateways)",
        )
    for i, lst in enumerate(_list(doc, s.get("listeners"), ("spec", "listeners"), "listeners")):
        at = ("spec", "listeners", i)
        if not isinstance(lst, dict):
            doc.fail(at, "a listener must be a mapping")
        _only(doc, lst, {"name", "port", "protocol", "allowedRoutes"}, at, "Gateway listener")
        if lst.get("protocol", "HBONE") != "HBONE" or lst.get("port", HBONE_PORT) != HBONE_PORT:
            doc.fail(at, f"a waypoint listens with protocol HBONE on port {HBONE_PORT} only")
    return Waypoint(name, ns, doc.at())


def _string_match(doc: _Doc, v, keys: tuple, what: str) -> StringMatch:
    if not isinstance(v, dict) or len(v) != 1:
        doc.fail(keys, f"{what} must be one of exact, prefix or regex")
    (kind, value), = v.items()  # fmt: skip
    if kind not in ("exact", "prefix", "regex"):
        doc.fail((*keys, kind), f"{what}: unknown match {kind!r} (known: exact, prefix, regex)")
    value = _str(doc, value, (*keys, kind), f"{what}.{kind}")
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as e:
            doc.fail((*keys, kind), f"{what}.regex {value!r} is not a regular expression: {e}")
    return StringMatch(kind, value)


def _match(doc: _Doc, v, keys: tuple) -> HttpMatch:
    if not isinstance(v, dict):
        doc.fail(keys, "a match must be a mapping")
    _only(doc, v, {"name", "uri", "method", "headers"}, keys, "HTTP match")
    uri = _string_match(doc, v["uri"], (*keys, "uri"), "uri") if "uri" in v else None
    method = _string_match(doc, v["method"], (*keys, "method"), "method") if "method" in v else None
    headers = []
    hs = v.get("headers") or {}
    if not isinstance(hs, dict):
        doc.fail((*keys, "headers"), "headers must be a mapping of header name to match")
    for h, hm in hs.items():
        if not isinstance(h, str) or not re.match(r"^[a-z0-9!#$%&'*+.^_`|~-]+$", h):
            doc.fail((*keys, "headers", h), f"header name {h!r} must be lower-case HTTP token")
        headers.append((h, _string_match(doc, hm, (*keys, "headers", h), f"header {h}")))
    return HttpMatch(uri, method, tuple(headers))


def _retries(doc: _Doc, v, keys: tuple) -> Retries:
    if not isinstance(v, dict):
        doc.fail(keys, "retries must be a mapping")
    _only(doc, v, {"attempts", "perTryTimeout", "retryOn"}, keys, "retries")
    attempts = _int(doc, v.get("attempts", 0), (*keys, "attempts"), "retries.attempts", 0, 100)
    per_try = (duration(doc, v["perTryTimeout"], (*keys, "perTryTimeout"), "perTryTimeout")
               if "perTryTimeout" in v else None)  # fmt: skip
    retry_on = Retries(0).retry_on
    if "retryOn" in v:
        retry_on = _str(doc, v["retryOn"], (*keys, "retryOn"), "retries.retryOn")
        for cond in retry_on.split(","):
            c = cond.strip()
            if c not in RETRY_ON and not c.isdigit():
                doc.fail((*keys, "retryOn"),
                         f"retries.retryOn: unknown condition {c!r} (known: "
                         f"{', '.join(sorted(RETRY_ON))}, or a status code)")  # fmt: skip
    return Retries(attempts, per_try, retry_on)


def _fault(doc: _Doc, v, keys: tuple) -> Fault:
    if not isinstance(v, dict):
        doc.fail(keys, "fault must be a mapping")
    _only(doc, v, {"abort", "delay"}, keys, "fault")
    f = {}
    if "abort" in v:
        a, at = v["abort"], (*keys, "abort")
        if not isinstance(a, dict):
            doc.fail(at, "fault.abort must be a mapping")
        _only(doc, a, {"httpStatus", "percentage"}, at, "fault.abort")
        f["abort_status"] = _int(doc, a.get("httpStatus"), (*at, "httpStatus"),
                                 "fault.abort.httpStatus", 200, 599)  # fmt: skip
        f["abort_percent"] = _percent(doc, a.get("percentage", 100), (*at, "percentage"),
                                      "fault.abort.percentage")  # fmt: skip
    if "delay" in v:
        d, at = v["delay"], (*keys, "delay")
        if not isinstance(d, dict):
            doc.fail(at, "fault.delay must be a mapping")
        _only(doc, d, {"fixedDelay", "percentage"}, at, "fault.delay")
        f["delay"] = duration(doc, d.get("fixedDelay"), (*at, "fixedDelay"), "fixedDelay")
        f["delay_percent"] = _percent(doc, d.get("percentage", 100), (*at, "percentage"),
                                      "fault.delay.percentage")  # fmt: skip
    return Fault(**f)


def host_key(host: str, namespace: str) -> str:
    """A VirtualService or DestinationRule host as a service key (namespace/name): a short
    name is in the document's namespace, name.namespace and name.namespace.svc.cluster.local
    name theirs. "" when host cannot name a service (a wildcard, an outside name)."""
    h = host.rstrip(".")
    for suffix in (f".svc.{CLUSTER_DOMAIN}", ".svc"):
        if h.endswith(suffix):
            h = h[: -len(suffix)]
            break
    parts = h.split(".")
    if len(parts) == 1 and parts[0] and "*" not in h:
        return f"{namespace}/{parts[0]}"
    if len(parts) == 2 and all(parts) and "*" not in h:
        return f"{parts[1]}/{parts[0]}"
    return ""


def _host(doc: _Doc, v, keys: tuple, ns: str, what: str) -> str:
    h = _str(doc, v, keys, what)
    key = host_key(h, ns)
    if not key:
        doc.fail(keys, f"{what} {h!r} names no service (write name, name.namespace or "
                       f"name.namespace.svc.{CLUSTER_DOMAIN}; wildcards are not served)")  # fmt: skip
    return key


def parse_virtual_service(doc: _Doc) -> VirtualService:
    name, ns, _ = _meta(doc)
    s = _spec(doc)
    _only(doc, s, {"hosts", "http", "gateways", "exportTo"}, ("spec",), "VirtualService spec")
    if s.get("gateways") not in (None, ["mesh"]):
        doc.fail(("spec", "gateways"), "gateways: only the mesh (its waypoints) is served here")
    hosts = _list(doc, s.get("hosts"), ("spec", "hosts"), "spec.hosts")
    if not hosts:
        doc.fail(("spec", "hosts"), f"VirtualService {ns}/{name}: spec.hosts is required")
    keys = tuple(_host(doc, h, ("spec", "hosts", i), ns, "host") for i, h in enumerate(hosts))
    routes = []
    for i, r in enumerate(_list(doc, s.get("http"), ("spec", "http"), "spec.http")):
        at = ("spec", "http", i)
        if not isinstance(r, dict):
            doc.fail(at, "an http route must be a mapping")
        _only(doc, r, {"name", "match", "route", "timeout", "retries", "fault"}, at, "http route")
        matches = tuple(_match(doc, mv, (*at, "match", j))
                        for j, mv in enumerate(_list(doc, r.get("match"), (*at, "match"), "match")))  # fmt: skip
        dests = []
        rl = _list(doc, r.get("route"), (*at, "route"), "route")
        if not rl:
            doc.fail(at, "an http route needs at least one route destination")
        for j, d in enumerate(rl):
            dat = (*at, "route", j)
            if not isinstance(d, dict):
                doc.fail(dat, "a route destination must be a mapping")
            _only(doc, d, {"destination", "weight"}, dat, "route destination")
            dd = d.get("destination")
            if not isinstance(dd, dict):
                doc.fail(dat, "route destination needs destination: {host: ...}")
            _only(doc, dd, {"host", "subset", "port"}, (*dat, "destination"), "destination")
            port = 0
            if "port" in dd:
                p = dd["port"]
                if not isinstance(p, dict) or set(p) != {"number"}:
                    doc.fail((*dat, "destination", "port"), "destination.port is {number: N}")
                port = _port(doc, p["number"], (*dat, "destination", "port"), "destination.port")
            weight = (_int(doc, d["weight"], (*dat, "weight"), "weight", 0, 100)
                      if "weight" in d else (100 if len(rl) == 1 else -1))  # fmt: skip
            if weight < 0:
                doc.fail(dat, "with several destinations each needs a weight (they sum to 100)")
            dests.append(Destination(
                _host(doc, dd.get("host"), (*dat, "destination", "host"), ns, "destination.host"),
                _str(doc, dd.get("subset"), (*dat, "destination", "subset"), "subset", ""),
                port, weight, doc.at(*dat, "destination")))  # fmt: skip
        if sum(d.weight for d in dests) != 100:
            doc.fail((*at, "route"), f"the weights sum to {sum(d.weight for d in dests)}, not 100")
        routes.append(HttpRoute(
            _str(doc, r.get("name"), (*at, "name"), "name", "") or f"route-{i}",
            matches, tuple(dests),
            duration(doc, r["timeout"], (*at, "timeout"), "timeout") if "timeout" in r else None,
            _retries(doc, r["retries"], (*at, "retries")) if "retries" in r else None,
            _fault(doc, r["fault"], (*at, "fault")) if "fault" in r else None,
            doc.at(*at)))  # fmt: skip
    return VirtualService(name, ns, keys, tuple(routes), doc.at())


def _traffic_policy(doc: _Doc, v, keys: tuple) -> TrafficPolicy:
    if not isinstance(v, dict):
        doc.fail(keys, "trafficPolicy must be a mapping")
    _only(doc, v, {"loadBalancer", "connectionPool", "outlierDetection"}, keys, "trafficPolicy")
    out: dict = {}
    if "loadBalancer" in v:
        lb, at = v["loadBalancer"], (*keys, "loadBalancer")
        if not isinstance(lb, dict):
            doc.fail(at, "loadBalancer must be a mapping")
        _only(doc, lb, {"simple"}, at, "loadBalancer")
        simple = _str(doc, lb.get("simple"), (*at, "simple"), "loadBalancer.simple")
        if simple not in LB_SIMPLE:
            doc.fail((*at, "simple"), f"loadBalancer.simple {simple!r} is not one of "
                                      f"{', '.join(LB_SIMPLE)}")  # fmt: skip
        out["lb"] = {"LEAST_CONN": "LEAST_REQUEST", "UNSPECIFIED": "", "PASSTHROUGH": ""}.get(
            simple, simple
        )
    if "connectionPool" in v:
        cp, at = v["connectionPool"], (*keys, "connectionPool")
        if not isinstance(cp, dict):
            doc.fail(at, "connectionPool must be a mapping")
        _only(doc, cp, {"tcp", "http"}, at, "connectionPool")
        tcp, http = cp.get("tcp") or {}, cp.get("http") or {}
        _only(doc, tcp, {"maxConnections", "connectTimeout"}, (*at, "tcp"), "connectionPool.tcp")
        _only(doc, http, {"http1MaxPendingRequests", "http2MaxRequests",
                          "maxRequestsPerConnection", "maxRetries"},
              (*at, "http"), "connectionPool.http")  # fmt: skip
        if "connectTimeout" in tcp:
            duration(doc, tcp["connectTimeout"], (*at, "tcp", "connectTimeout"), "connectTimeout")
        for src, dst, k in (
            (tcp, "max_connections", "maxConnections"),
            (http, "max_pending", "http1MaxPendingRequests"),
            (http, "max_requests", "http2MaxRequests"),
            (http, "max_requests_per_connection", "maxRequestsPerConnection"),
            (http, "max_retries", "maxRetries"),
        ):
            if k in src:
                where = (*at, "tcp" if src is tcp else "http", k)
                out[dst] = _int(doc, src[k], where, k, 1 if k != "maxRetries" else 0)
    if "outlierDetection" in v:
        od, at = v["outlierDetection"], (*keys, "outlierDetection")
        if not isinstance(od, dict):
            doc.fail(at, "outlierDetection must be a mapping")
        _only(doc, od, {"consecutive5xxErrors", "consecutiveErrors", "interval",
                        "baseEjectionTime", "maxEjectionPercent"}, at, "outlierDetection")  # fmt: skip
        for k in ("consecutive5xxErrors", "consecutiveErrors"):
            if k in od:
                out["consecutive_5xx"] = _int(doc, od[k], (*at, k), k, 0)
        for k, dst in (("interval", "interval"), ("baseEjectionTime", "base_ejection")):
            if k in od:
                out[dst] = duration(doc, od[k], (*at, k), k)
        if "maxEjectionPercent" in od:
            out["max_ejection_percent"] = _int(doc, od["maxEjectionPercent"],
                                               (*at, "maxEjectionPercent"), "maxEjectionPercent",
                                               0, 100)  # fmt: skip
    return TrafficPolicy(**out)


def parse_destination_rule(doc: _Doc) -> DestinationRule:
    name, ns, _ = _meta(doc)
    s = _spec(doc)
    _only(doc, s, {"host", "subsets", "trafficPolicy", "exportTo"}, ("spec",),
          "DestinationRule spec")  # fmt: skip
    svc = _host(doc, s.get("host"), ("spec", "host"), ns, "spec.host")
    subsets, seen = [], set()
    for i, sub in enumerate(_list(doc, s.get("subsets"), ("spec", "subsets"), "subsets")):
        at = ("spec", "subsets", i)
        if not isinstance(sub, dict):
            doc.fail(at, "a subset must be a mapping")
        _only(doc, sub, {"name", "labels", "trafficPolicy"}, at, "subset")
        sname = _str(doc, sub.get("name"), (*at, "name"), "subset name")
        if sname in seen:
            doc.fail((*at, "name"), f"subset {sname} is defined twice")
        seen.add(sname)
        labels = _str_map(doc, sub.get("labels"), (*at, "labels"), "subset labels")
        if not labels:
            doc.fail(at, f"subset {sname} needs labels (the pods it is made of)")
        tp = (_traffic_policy(doc, sub["trafficPolicy"], (*at, "trafficPolicy"))
              if "trafficPolicy" in sub else None)  # fmt: skip
        subsets.append(Subset(sname, labels, tp))
    tp = (_traffic_policy(doc, s["trafficPolicy"], ("spec", "trafficPolicy"))
          if "trafficPolicy" in s else None)  # fmt: skip
    return DestinationRule(name, ns, svc, tuple(subsets), tp, doc.at())


_PATH_TYPES = {"PathPrefix": "prefix", "Exact": "exact", "RegularExpression": "regex"}
_VALUE_TYPES = {"Exact": "exact", "RegularExpression": "regex"}


def parse_http_route(doc: _Doc) -> VirtualService:
    """Gateway API's HTTPRoute with a Service parentRef (Istio ambient's way to route a
    service at its waypoint), read into the routes a VirtualService makes. Weights are
    relative, as the Gateway API says; backends are Services."""
    name, ns, _ = _meta(doc)
    s = _spec(doc)
    _only(doc, s, {"parentRefs", "rules", "hostnames"}, ("spec",), "HTTPRoute spec")
    hosts = []
    for i, ref in enumerate(_list(doc, s.get("parentRefs"), ("spec", "parentRefs"), "parentRefs")):
        at = ("spec", "parentRefs", i)
        if not isinstance(ref, dict):
            doc.fail(at, "a parentRef is a mapping of group, kind and name")
        _only(doc, ref, {"group", "kind", "name", "namespace", "port"}, at, "parentRef")
        if (ref.get("kind"), ref.get("group", "")) != ("Service", ""):
            doc.fail(at, "parentRefs: only a Service (kind Service, group \"\") is served here "
                         "(the waypoint routes that service's traffic)")  # fmt: skip
        hosts.append(
            f"{ref.get('namespace', ns)}/{_str(doc, ref.get('name'), (*at, 'name'), 'name')}"
        )
    if not hosts:
        doc.fail(("spec",), f"HTTPRoute {ns}/{name}: spec.parentRefs names no Service")
    routes = []
    for i, rule in enumerate(_list(doc, s.get("rules"), ("spec", "rules"), "rules")):
        at = ("spec", "rules", i)
        if not isinstance(rule, dict):
            doc.fail(at, "a rule must be a mapping")
        _only(doc, rule, {"name", "matches", "backendRefs", "timeouts"}, at, "HTTPRoute rule")
        matches = []
        for j, mt in enumerate(_list(doc, rule.get("matches"), (*at, "matches"), "matches")):
            mat = (*at, "matches", j)
            if not isinstance(mt, dict):
                doc.fail(mat, "a match must be a mapping")
            _only(doc, mt, {"path", "headers", "method"}, mat, "HTTPRoute match")
            uri = None
            if "path" in mt:
                pth = mt["path"]
                if not isinstance(pth, dict) or pth.get("type", "PathPrefix") not in _PATH_TYPES:
                    doc.fail((*mat, "path"), f"path.type is one of {', '.join(_PATH_TYPES)}")
                uri = StringMatch(_PATH_TYPES[pth.get("type", "PathPrefix")],
                                  _str(doc, pth.get("value", "/"), (*mat, "path"), "path.value"))  # fmt: skip
            headers = []
            for k, h in enumerate(_list(doc, mt.get("headers"), (*mat, "headers"), "headers")):
                hat = (*mat, "headers", k)
                if not isinstance(h, dict) or h.get("type", "Exact") not in _VALUE_TYPES:
                    doc.fail(hat, "a header match is {name, value, type: Exact|RegularExpression}")
                hname = _str(doc, h.get("name"), hat, "header name").lower()
                headers.append((hname, StringMatch(_VALUE_TYPES[h.get("type", "Exact")],
                                                   _str(doc, h.get("value"), hat, "value"))))  # fmt: skip
            method = (StringMatch("exact", _str(doc, mt["method"], (*mat, "method"), "method"))
                      if "method" in mt else None)  # fmt: skip
            matches.append(HttpMatch(uri, method, tuple(headers)))
        dests = []
        for j, b in enumerate(
            _list(doc, rule.get("backendRefs"), (*at, "backendRefs"), "backendRefs")
        ):
            bat = (*at, "backendRefs", j)
            if not isinstance(b, dict):
                doc.fail(bat, "a backendRef is a mapping of name, port and weight")
            _only(
                doc, b, {"group", "kind", "name", "namespace", "port", "weight"}, bat, "backendRef"
            )
            if (b.get("kind", "Service"), b.get("group", "")) != ("Service", ""):
                doc.fail(bat, "backendRefs: only Services are served here")
            port = _port(doc, b["port"], (*bat, "port"), "port") if "port" in b else 0
            weight = _int(doc, b.get("weight", 1), (*bat, "weight"), "weight", 0, 1_000_000)
            svc = f"{b.get('namespace', ns)}/{_str(doc, b.get('name'), (*bat, 'name'), 'name')}"
            dests.append(Destination(svc, "", port, weight, doc.at(*bat)))
        if not dests:
            doc.fail(at, "a rule needs backendRefs (this mesh does not answer requests itself)")
        if not any(d.weight for d in dests):
            doc.fail((*at, "backendRefs"), "every backend has weight 0: nothing would be served")
        timeout = None
        t = rule.get("timeouts")
        if t is not None:
            if not isinstance(t, dict):
                doc.fail((*at, "timeouts"), "timeouts must be a mapping")
            _only(doc, t, {"request", "backendRequest"}, (*at, "timeouts"), "timeouts")
            if "request" in t:
                timeout = duration(
                    doc, t["request"], (*at, "timeouts", "request"), "timeouts.request"
                )
        routes.append(HttpRoute(_str(doc, rule.get("name"), (*at, "name"), "name", "") or f"rule-{i}",
                                tuple(matches), tuple(dests), timeout, None, None, doc.at(*at)))  # fmt: skip
    return VirtualService(name, ns, tuple(hosts), tuple(routes), doc.at(), "HTTPRoute")


# ---- across documents ------------------------------------------------------------------------


class RoutingError(ValueError):
    """A routing document that does not fit the rest of the state (origin: file:line)."""


def check(state: m.State) -> None:
    """What one document cannot check alone: every host is a service, every subset is defined
    by the service's DestinationRule and matches a pod, one VirtualService and one
    DestinationRule per service. Raises RoutingError naming the document's file and line."""
    rules: dict[str, DestinationRule] = {}
    for dr in state.destination_rules.values():
        if dr.service not in state.services:
            raise RoutingError(f"{dr.origin}: DestinationRule {dr.key}: host {dr.service} is "
                               "no service in the registry")  # fmt: skip
        if dr.service in rules:
            raise RoutingError(f"{dr.origin}: DestinationRule {dr.key}: service {dr.service} "
                               f"already has DestinationRule {rules[dr.service].key}")  # fmt: skip
        rules[dr.service] = dr
        svc = state.services[dr.service]
        pods = state.endpoints(svc)
        for sub in dr.subsets:
            if not any(all(w.labels.get(k) == v for k, v in sub.labels.items()) for w in pods):
                raise RoutingError(
                    f"{dr.origin}: DestinationRule {dr.key}: subset {sub.name} "
                    f"({', '.join(f'{k}={v}' for k, v in sub.labels.items())}) matches none of "
                    f"{svc.key}'s pods ({', '.join(w.key for w in pods) or 'it has none'})"
                )
    routed: dict[str, VirtualService] = {}
    for vs in state.routes():
        for host in vs.hosts:
            if host not in state.services:
                raise RoutingError(f"{vs.origin}: {vs.kind} {vs.key}: {host} is no service in "
                                   "the registry")  # fmt: skip
            if host in routed:
                raise RoutingError(f"{vs.origin}: {vs.kind} {vs.key}: service {host} is already "
                                   f"routed by {routed[host].kind} {routed[host].key}")  # fmt: skip
            routed[host] = vs
        for r in vs.http:
            for d in r.destinations:
                if d.service not in state.services:
                    raise RoutingError(f"{d.origin}: {vs.kind} {vs.key}: route to "
                                       f"{d.service}, which is no service in the registry")  # fmt: skip
                svc = state.services[d.service]
                if d.port and not any(p.port == d.port for p in svc.ports):
                    raise RoutingError(f"{d.origin}: {vs.kind} {vs.key}: {d.service} has "
                                       f"no port {d.port}")  # fmt: skip
                if d.subset and (d.service not in rules or not rules[d.service].subset(d.subset)):
                    raise RoutingError(
                        f"{d.origin}: VirtualService {vs.key}: subset {d.subset} of "
                        f"{d.service} is defined by no DestinationRule"
                    )
