"""Istio AuthorizationPolicy at L4: the decision the tunnel enforces and `dabba policy check` explains.

Semantics (Istio's, CUSTOM aside):
1. DENY policies first: if any DENY policy that applies to the destination
   workload matches, the connection is denied.
2. Then ALLOW: if no ALLOW policy applies to the workload, allow; if one
   applies and matches, allow; otherwise deny.
AUDIT policies never change the decision.

A policy matches if any of its rules matches; a policy without rules
matches nothing (so an ALLOW policy without rules denies everything it
applies to: Istio's allow-nothing). A rule matches when its from, to and
when all match; a list (sources, operations, values) matches when any
entry does, an entry when all its fields do; not* fields must match none.
Principals and namespaces come from the peer's verified SPIFFE identity,
so a plaintext peer matches no principal or namespace rule. Strings match
exactly, by prefix ("abc*"), by suffix ("*abc") or anything ("*").

A rule with L7 fields fails safe: in ALLOW it never matches, in DENY it
always does.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..control import model as m


@dataclass(frozen=True)
class Request:
    """One connection, as the destination's enforcement point sees it."""

    src_ip: str
    dst_ip: str
    dst_port: int
    src_identity: str | None  # spiffe://td/ns/x/sa/y when mutual TLS, else None

    @property
    def principal(self) -> str | None:
        """Istio's principal form: td/ns/x/sa/y (the SPIFFE ID without its scheme)."""
        return self.src_identity.removeprefix("spiffe://") if self.src_identity else None

    @property
    def namespace(self) -> str | None:
        p = self.principal
        if not p:
            return None
        parts = p.split("/")
        return parts[2] if len(parts) >= 5 and parts[1] == "ns" else None


@dataclass(frozen=True)
class Decision:
    """The verdict and what decided it."""

    allowed: bool
    reason: str
    policy: str | None = None  # namespace/name
    rule: int | None = None
    origin: str = ""  # file:line of the policy

    @property
    def verdict(self) -> str:
        return "allow" if self.allowed else "deny"


def _str_match(pattern: str, value: str | None) -> bool:
    if value is None:
        return False
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def _any_str(patterns, value) -> bool:
    return any(_str_match(p, value) for p in patterns)


def _in_cidrs(cidrs, ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr in ipaddress.ip_network(c, strict=False) for c in cidrs)


def _source_matches(s: m.Source, r: Request) -> bool:
    if s.principals and not _any_str(s.principals, r.principal):
        return False
    if s.not_principals and _any_str(s.not_principals, r.principal):
        return False
    if s.namespaces and not _any_str(s.namespaces, r.namespace):
        return False
    if s.not_namespaces and _any_str(s.not_namespaces, r.namespace):
        return False
    if s.ip_blocks and not _in_cidrs(s.ip_blocks, r.src_ip):
        return False
    return not (s.not_ip_blocks and _in_cidrs(s.not_ip_blocks, r.src_ip))


def _operation_matches(o: m.Operation, r: Request) -> bool:
    if o.ports and r.dst_port not in o.ports:
        return False
    return not (o.not_ports and r.dst_port in o.not_ports)


def _condition_value(key: str, r: Request) -> str | None:
    return {
        "source.ip": r.src_ip,
        "source.namespace": r.namespace,
        "source.principal": r.principal,
        "destination.ip": r.dst_ip,
        "destination.port": str(r.dst_port),
    }.get(key)


def _condition_matches(c: m.Condition, r: Request) -> bool:
    v = _condition_value(c.key, r)
    ip_key = c.key in ("source.ip", "destination.ip")

    def hit(vals) -> bool:
        if ip_key:
            return v is not None and _in_cidrs(vals, v)
        return _any_str(vals, v)

    if c.values and not hit(c.values):
        return False
    return not (c.not_values and hit(c.not_values))


def rule_matches(rule: m.Rule, action: str, r: Request) -> bool:
    if rule.l7_fields:
        return action == "DENY"  # fail safe: see the module docstring
    if rule.sources and not any(_source_matches(s, r) for s in rule.sources):
        return False
    if rule.operations and not any(_operation_matches(o, r) for o in rule.operations):
        return False
    return all(_condition_matches(c, r) for c in rule.conditions)


def _first_match(p: m.AuthorizationPolicy, r: Request) -> int | None:
    for i, rule in enumerate(p.rules):
        if rule_matches(rule, p.action, r):
            return i
    return None


def evaluate(policies, workload: m.Workload, r: Request) -> Decision:
    """The decision for a connection to workload; policies: every policy the node holds."""
    applying = sorted((p for p in policies if p.applies_to(workload)), key=lambda p: p.key)
    for p in applying:
        if p.action == "DENY" and (i := _first_match(p, r)) is not None:
            why = f"denied by DENY policy {p.key} rule {i}"
            if p.rules[i].l7_fields:
                why += f" (L7 field {', '.join(p.rules[i].l7_fields)} fails safe at L4)"
            return Decision(False, why, p.key, i, p.origin)
    allows = [p for p in applying if p.action == "ALLOW"]
    if not allows:
        return Decision(True, "allowed: no ALLOW policy applies to the workload")
    for p in allows:
        if (i := _first_match(p, r)) is not None:
            return Decision(True, f"allowed by ALLOW policy {p.key} rule {i}", p.key, i, p.origin)
    names = ", ".join(p.key for p in allows)
    return Decision(False, f"denied: no rule of the ALLOW policies that apply matched ({names})")
