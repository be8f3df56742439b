"""The same-node verdict compiler (agent/node/verdicts.py) against evaluate(), the one place
that decides Istio's L4 semantics: over random policy sets, every (source, destination
address, port) the kernel can look up gets exactly evaluate()'s verdict, policy and rule."""

import random

import pytest

from agent.control import model as m
from agent.node.verdicts import Endpoint, compile_verdicts, lookup, port_classes
from agent.ztunnel.policy import Request, evaluate

TD = "cluster.local"
NAMESPACES = ("front", "back", "istio-system")
PORTS = (80, 443, 8080, 9090, 15001)


def _workloads() -> list[Endpoint]:
    out = []
    for i in range(6):
        ns = NAMESPACES[i % 2]
        w = m.Workload(
            f"w{i}", ns, f"sa{i % 3}", "n1", f"10.20.1.{11 + i}",
            {"app": f"a{i % 3}"}, ip6=f"fd00:20:1::{11 + i:x}" if i % 3 else "",
        )  # fmt: skip
        out.append(Endpoint(1000 + i, w, w.spiffe(TD)))
    return out


def _rule(rng: random.Random, local: list[Endpoint]) -> m.Rule:
    def some(pool, k=2):
        return tuple(rng.sample(pool, rng.randint(1, k)))

    principals = [f"{TD}/ns/{e.workload.namespace}/sa/{e.workload.service_account}" for e in local]
    principals += [f"{TD}/ns/front/*", "*", "*/sa/sa1"]
    blocks = ["10.20.1.0/28", "10.20.1.12/32", "fd00:20:1::/64", "fd00:20:1::c/128", "10.0.0.0/8"]
    sources, operations, conditions = [], [], []
    for _ in range(rng.randint(0, 2)):
        f = {}
        for key, pool in (
            ("principals", principals), ("not_principals", principals),
            ("namespaces", list(NAMESPACES) + ["fr*"]), ("not_namespaces", list(NAMESPACES)),
            ("ip_blocks", blocks), ("not_ip_blocks", blocks),
        ):  # fmt: skip
            if rng.random() < 0.3:
                f[key] = some(pool)
        sources.append(m.Source(**f))
    for _ in range(rng.randint(0, 2)):
        f = {}
        if rng.random() < 0.6:
            f["ports"] = some(PORTS)
        if rng.random() < 0.3:
            f["not_ports"] = some(PORTS)
        operations.append(m.Operation(**f))
    for _ in range(rng.randint(0, 1)):
        key = rng.choice(sorted(m.L4_CONDITION_KEYS))
        pool = {
            "source.ip": blocks,
            "destination.ip": blocks,
            "source.namespace": list(NAMESPACES),
            "source.principal": principals,
            "destination.port": [str(p) for p in PORTS],
        }[key]
        if rng.random() < 0.5:
            conditions.append(m.Condition(key, values=some(pool)))
        else:
            conditions.append(m.Condition(key, not_values=some(pool)))
    l7 = ("methods",) if rng.random() < 0.05 else ()
    return m.Rule(tuple(sources), tuple(operations), tuple(conditions), l7)


def _policies(rng: random.Random, local: list[Endpoint]) -> list[m.AuthorizationPolicy]:
    out = []
    for i in range(rng.randint(0, 4)):
        ns = rng.choice(NAMESPACES)
        sel = {"app": f"a{rng.randint(0, 2)}"} if rng.random() < 0.6 else None
        rules = tuple(_rule(rng, local) for _ in range(rng.randint(0, 3)))
        action = rng.choice(("ALLOW", "ALLOW", "DENY", "AUDIT"))
        out.append(m.AuthorizationPolicy(f"p{i}", ns, action, sel, rules, root="istio-system"))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_the_kernels_table_decides_exactly_as_evaluate(seed):
    rng = random.Random(seed)
    local = _workloads()
    policies = _policies(rng, local)
    c = compile_verdicts(policies, local, limit=100_000)
    assert not c.left_out  # no pattern ports here: every destination is compiled
    checked = 0
    for _ in range(60):  # 40 seeds x 60 = 2,400 triples
        src, dst = rng.choice(local), rng.choice(local)
        fam = rng.choice((4, 6))
        dst_ip = dst.workload.ip if fam == 4 else dst.workload.ip6
        src_ip = src.workload.ip if fam == 4 else src.workload.ip6
        port = rng.choice((*PORTS, 1, 22, 5432, 65535))
        got = lookup(c, src.cgroup_id, dst_ip, port)
        if not dst_ip or not src_ip:
            assert got is None  # no address of that family: the tunnel decides
            continue
        want = evaluate(policies, dst.workload, Request(src_ip, dst_ip, port, src.identity))
        assert got is not None
        assert (got.allowed, got.policy, got.rule) == (want.allowed, want.policy, want.rule), (
            src.workload.key, dst_ip, port, got.reason, want.reason,
        )  # fmt: skip
        checked += 1
    assert checked > 30


def test_a_port_pattern_leaves_the_destination_to_the_tunnel():
    local = _workloads()
    cond = m.Condition("destination.port", values=("80*",))
    p = m.AuthorizationPolicy("p", "front", "ALLOW", {"app": "a0"}, (m.Rule(conditions=(cond,)),))
    assert port_classes([p]) == "front/p: destination.port '80*' is a pattern"
    c = compile_verdicts([p], local, limit=100_000)
    assert c.left_out == {"front/w0": "front/p: destination.port '80*' is a pattern"}
    assert lookup(c, local[1].cgroup_id, local[0].workload.ip, 8080) is None
    assert lookup(c, local[0].cgroup_id, local[1].workload.ip, 8080) is not None


def test_too_many_verdicts_compile_to_none_at_all():
    local = _workloads()
    c = compile_verdicts([], local, limit=10)
    assert c.entries == {} and "more than 10 verdicts" in c.left_out["*"]
