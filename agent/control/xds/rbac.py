"""Istio's AuthorizationPolicy at a waypoint: Envoy's RBAC HTTP filter, as Istio evaluates it.

The policies that target the waypoint's Gateway, or the Service a listener serves, become two
RBAC filters in that listener: the DENY policies first (a match answers 403), then, when there
are ALLOW policies, an ALLOW filter (no match answers 403). AUDIT policies change nothing.

Each rule is one RBAC policy: ``to`` (operations: methods, paths, hosts, ports and their
negations) and the request-header conditions of ``when`` become its permissions; ``from``
(principals, namespaces and their negations) and the identity conditions of ``when`` become
its principals. The caller's identity is the SPIFFE ID of the client certificate the HBONE
connection presented, kept as filter state (waypoint.SOURCE_PRINCIPAL): Istio's principals
``<trust domain>/ns/<namespace>/sa/<account>`` are that ID without ``spiffe://``.

What a waypoint cannot decide here (source addresses: ipBlocks, remoteIpBlocks, source.ip;
request principals: JWT) makes the rule fail safe, as an L7 rule does in a tunnel: an ALLOW
rule never matches, a DENY rule matches every request.
"""

from __future__ import annotations

import re

from .. import model as m

T = "type.googleapis.com/envoy."
NEVER = {"not_rule": {"any": True}}
NEVER_ID = {"not_id": {"any": True}}
UNDECIDABLE_SOURCE = ("ip_blocks", "not_ip_blocks")


def _istio_value(v: str) -> dict:
    """Istio's value syntax: exact, prefix*, *suffix, or * (anything)."""
    if v == "*":
        return {"safe_regex": {"regex": ".*"}}
    if v.endswith("*"):
        return {"prefix": v[:-1]}
    if v.startswith("*"):
        return {"suffix": v[1:]}
    return {"exact": v}


def _principal_match(v: str) -> dict:
    """An Istio principal value against the caller's SPIFFE ID."""
    sm = _istio_value(v)
    if "exact" in sm:
        return {"exact": "spiffe://" + sm["exact"]}
    if "prefix" in sm:
        return {"prefix": "spiffe://" + sm["prefix"]}
    return sm


def _source(key: str, sm: dict) -> dict:
    return {"filter_state": {"key": key, "string_match": sm}}


def _namespace_match(ns: str) -> dict:
    if ns == "*":
        return {"safe_regex": {"regex": "^spiffe://[^/]+/ns/[^/]+/sa/.*"}}
    body = re.escape(ns[:-1]) + "[^/]*" if ns.endswith("*") else (
        "[^/]*" + re.escape(ns[1:]) if ns.startswith("*") else re.escape(ns))  # fmt: skip
    return {"safe_regex": {"regex": f"^spiffe://[^/]+/ns/{body}/sa/.*"}}


def _any_of(items: list[dict], key: str) -> dict:
    return (
        items[0] if len(items) == 1 else {key: {"rules" if key.endswith("rules") else "ids": items}}
    )


def _header(name: str, v: str) -> dict:
    return {"header": {"name": name, "string_match": _istio_value(v)}}


def _path(v: str) -> dict:
    return {"url_path": {"path": _istio_value(v)}}


def _operation(op: m.Operation, port: int, target_port: int) -> dict:
    """An operation as one permission: every field given must match."""
    ports = (port, target_port)
    if op.ports and not any(p in op.ports for p in ports):
        return NEVER
    if any(p in op.not_ports for p in ports):
        return NEVER
    parts = []
    for values, name, negate in (
        (op.methods, ":method", False), (op.not_methods, ":method", True),
        (op.hosts, ":authority", False), (op.not_hosts, ":authority", True),
    ):  # fmt: skip
        if values:
            rule = _any_of([_header(name, v) for v in values], "or_rules")
            parts.append({"not_rule": rule} if negate else rule)
    if op.paths:
        parts.append(_any_of([_path(v) for v in op.paths], "or_rules"))
    if op.not_paths:
        parts.append({"not_rule": _any_of([_path(v) for v in op.not_paths], "or_rules")})
    if not parts:
        return {"any": True}
    return parts[0] if len(parts) == 1 else {"and_rules": {"rules": parts}}


def _from(src: m.Source, principal_key: str) -> dict | None:
    """A source as one principal (None: a field the waypoint cannot decide)."""
    if any(getattr(src, f) for f in UNDECIDABLE_SOURCE):
        return None
    ids = []
    for values, match, negate in (
        (src.principals, _principal_match, False), (src.not_principals, _principal_match, True),
        (src.namespaces, _namespace_match, False), (src.not_namespaces, _namespace_match, True),
    ):  # fmt: skip
        if values:
            one = _any_of([_source(principal_key, match(v)) for v in values], "or_ids")
            ids.append({"not_id": one} if negate else one)
    if not ids:
        return {"any": True}
    return ids[0] if len(ids) == 1 else {"and_ids": {"ids": ids}}


def _condition(c: m.Condition, port: int, principal_key: str) -> tuple[str, dict] | None:
    """A when condition as ("permission" | "principal", matcher); None: undecidable here."""
    if c.key.startswith("request.headers[") and c.key.endswith("]"):
        name = c.key[len("request.headers["):-1].lower()  # fmt: skip
        pos = [_header(name, v) for v in c.values]
        neg = [_header(name, v) for v in c.not_values]
        parts = ([_any_of(pos, "or_rules")] if pos else []) + (
            [{"not_rule": _any_of(neg, "or_rules")}] if neg else [])  # fmt: skip
        return "permission", parts[0] if len(parts) == 1 else {"and_rules": {"rules": parts}}
    if c.key in ("source.principal", "source.namespace"):
        match = _principal_match if c.key == "source.principal" else _namespace_match
        pos = [_source(principal_key, match(v)) for v in c.values]
        neg = [_source(principal_key, match(v)) for v in c.not_values]
        parts = ([_any_of(pos, "or_ids")] if pos else []) + (
            [{"not_id": _any_of(neg, "or_ids")}] if neg else [])  # fmt: skip
        return "principal", parts[0] if len(parts) == 1 else {"and_ids": {"ids": parts}}
    if c.key == "destination.port":
        ok = (not c.values or str(port) in c.values) and str(port) not in c.not_values
        return "permission", {"any": True} if ok else NEVER
    return None


def _rule(rule: m.Rule, port: int, target_port: int, principal_key: str) -> dict | None:
    """One rule as an RBAC policy; None when the waypoint cannot decide it."""
    perms = [_operation(op, port, target_port) for op in rule.operations] or [{"any": True}]
    principals = []
    for src in rule.sources:
        p = _from(src, principal_key)
        if p is None:
            return None
        principals.append(p)
    principals = principals or [{"any": True}]
    extra_perm, extra_id = [], []
    for c in rule.conditions:
        got = _condition(c, port, principal_key)
        if got is None:
            return None
        (extra_perm if got[0] == "permission" else extra_id).append(got[1])
    perm = _any_of(perms, "or_rules")
    if extra_perm:
        perm = {"and_rules": {"rules": [perm, *extra_perm]}}
    ident = _any_of(principals, "or_ids")
    if extra_id:
        ident = {"and_ids": {"ids": [ident, *extra_id]}}
    return {"permissions": [perm], "principals": [ident]}


def filters(policies: list[m.AuthorizationPolicy], port: int, target_port: int,
            principal_key: str) -> list[dict]:  # fmt: skip
    """The RBAC HTTP filters of one service port for these policies (DENY, then ALLOW)."""
    out = []
    for action in ("DENY", "ALLOW"):
        pols = {}
        any_policy = False
        for p in sorted(policies, key=lambda p: p.key):
            if p.action != action:
                continue
            any_policy = True
            for i, rule in enumerate(p.rules):
                got = _rule(rule, port, target_port, principal_key)
                if got is None:  # fail safe: a DENY rule matches everything, an ALLOW none
                    got = ({"permissions": [{"any": True}], "principals": [{"any": True}]}
                           if action == "DENY" else None)  # fmt: skip
                if got is not None:
                    pols[f"{p.namespace}.{p.name}.{i}"] = got
        if not any_policy:
            continue
        out.append({"name": "envoy.filters.http.rbac", "typed_config": {
            "@type": T + "extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": action, "policies": pols},
        }})  # fmt: skip
    return out
