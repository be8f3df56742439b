"""Same-node verdicts: the Istio L4 AuthorizationPolicy set compiled into a table the kernel
reads at connect() (agent/bpf/connect.c, dabba_verdict).

Both ends of a same-node connection are known to the kernel: the source by the caller's
cgroup, the destination by its address. So for every (source workload, destination address,
port) of this node the verdict is fixed by the policies alone, and the compiler asks the one
place that decides: ``evaluate()`` of agent/ztunnel/policy.py. There is no second
implementation of Istio's semantics to drift from the first.

Ports: for one destination the verdict can only change at ports a policy names (``ports``,
``notPorts``, ``destination.port`` values); every other port shares one verdict, the wildcard
(port 0 in the table), decided on a port no policy names. A ``destination.port`` condition
with a pattern (``8*``) names no finite set: that destination is left out, and its same-node
connections keep going through the tunnel, which decides them as before.

What is left out falls back, never through: a (source, destination, port) without an entry is
captured to the tunnel as before this table existed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..control import model as m
from ..ztunnel.policy import Decision, Request, evaluate

MAX_PORT = 65535


@dataclass(frozen=True)
class Endpoint:
    """A workload of this node as the compiler needs it."""

    cgroup_id: int  # what the kernel knows the source by
    workload: m.Workload
    identity: str  # its SPIFFE ID


@dataclass
class Compiled:
    """The table: (source cgroup id, destination address, port or 0) -> rule index (1-based)
    into rules; each rule is a Decision (allowed, the reason, the policy)."""

    entries: dict[tuple[int, str, int], int]
    rules: list[Decision]
    left_out: dict[str, str]  # destination workload key -> why it is not compiled

    def decision(self, rule: int) -> Decision | None:
        return self.rules[rule - 1] if 0 < rule <= len(self.rules) else None


def port_classes(applying: list[m.AuthorizationPolicy]) -> set[int] | str:
    """The ports the policies that apply to a destination name, or why they name no finite
    set."""
    ports: set[int] = set()
    for p in applying:
        for rule in p.rules:
            for o in rule.operations:
                ports.update(o.ports)
                ports.update(o.not_ports)
            for c in rule.conditions:
                if c.key != "destination.port":
                    continue
                for v in (*c.values, *c.not_values):
                    if not v.isdigit():
                        return f"{p.key}: destination.port {v!r} is a pattern"
                    ports.add(int(v))
    return {p for p in ports if 0 < p <= MAX_PORT}


def _wildcard(ports: set[int]) -> int:
    """A port no policy names (the wildcard's representative)."""
    return next(p for p in range(1, MAX_PORT + 1) if p not in ports)


def compile_verdicts(policies, local: list[Endpoint], limit: int) -> Compiled:
    """Every verdict between this node's workloads; more than limit entries: none at all (the
    tunnel decides every same-node connection, as without the table)."""
    entries: dict[tuple[int, str, int], int] = {}
    rules: dict[tuple, int] = {}
    table: list[Decision] = []
    left_out: dict[str, str] = {}

    def rule_of(d: Decision) -> int:
        k = (d.allowed, d.reason, d.policy, d.rule)
        if k not in rules:
            table.append(d)
            rules[k] = len(table)
        return rules[k]

    for dst in local:
        w = dst.workload
        applying = [p for p in policies if p.applies_to(w)]
        ports = port_classes(applying)
        if isinstance(ports, str):
            left_out[w.key] = ports
            continue
        wild = _wildcard(ports)
        for src in local:
            for dst_ip, src_ip in ((w.ip, src.workload.ip), (w.ip6, src.workload.ip6)):
                if not dst_ip or not src_ip:
                    continue
                base = evaluate(policies, w, Request(src_ip, dst_ip, wild, src.identity))
                entries[(src.cgroup_id, dst_ip, 0)] = rule_of(base)
                for port in ports:
                    d = evaluate(policies, w, Request(src_ip, dst_ip, port, src.identity))
                    if (d.allowed, d.policy, d.rule) != (base.allowed, base.policy, base.rule):
                        entries[(src.cgroup_id, dst_ip, port)] = rule_of(d)
            if len(entries) > limit:
                return Compiled({}, [], {"*": f"more than {limit} verdicts: the map is too small"})
    return Compiled(entries, table, left_out)


def lookup(c: Compiled, src_cgroup: int, dst_ip: str, port: int) -> Decision | None:
    """What the kernel decides (connect.c): the port's own entry, else the wildcard's; None:
    no entry (the tunnel decides)."""
    rule = c.entries.get((src_cgroup, dst_ip, port))
    if rule is None:
        rule = c.entries.get((src_cgroup, dst_ip, 0))
    return c.decision(rule) if rule is not None else None
