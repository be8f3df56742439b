"""The kernel's same-node verdicts agree with `dabba policy check` (the tunnel's own evaluate())
on real connects: random Istio AuthorizationPolicy sets, and for each, every (source, destination,
port) of a node's four workloads tried with connect() from the source's own namespace. The
kernel refuses (EPERM) exactly where policy check says deny, and lets through (to a port with no
listener: ECONNREFUSED from the destination itself, no tunnel) exactly where it says allow."""

import json
import random

import pytest

from agent.lab import mesh
from agent.ops import client
from tests.conftest import helper, mesh_lab, spiffe, wait_for, write_registry

PORTS = list(range(7101, 7111))
ROUNDS = 9  # x 4 sources x 3 destinations x 10 ports = 1,080 triples


@pytest.fixture(scope="module")
def vlab():
    yield from mesh_lab("va", 1, 4, capture=True)


def _policies(rng: random.Random, pods) -> list[dict]:
    """A random set of ALLOW and DENY policies over the pods' identities, addresses and PORTS."""
    docs = []
    for i in range(rng.randint(1, 4)):
        rules = []
        for _ in range(rng.randint(0, 2)):
            rule: dict = {}
            src = {}
            who = rng.sample(pods, rng.randint(1, 2))
            kind = rng.choice(["principals", "notPrincipals", "ipBlocks", "none"])
            if kind in ("principals", "notPrincipals"):
                src[kind] = [spiffe(p).removeprefix("spiffe://") for p in who]
            elif kind == "ipBlocks":
                src[kind] = [f"{p.ip}/32" for p in who]
            if src:
                rule["from"] = [{"source": src}]
            if rng.random() < 0.7:
                rule["to"] = [{"operation": {"ports": [str(p) for p in rng.sample(PORTS, 3)]}}]
            rules.append(rule)
        spec: dict = {"action": rng.choice(["ALLOW", "DENY"]), "rules": rules}
        if rng.random() < 0.8:
            spec["selector"] = {"matchLabels": {"app": rng.choice(pods).name}}
        docs.append({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                     "metadata": {"name": f"p{i}", "namespace": "default"}, "spec": spec})  # fmt: skip
    return docs


def test_kernel_verdicts_agree_with_policy_check_on_1000_real_connects(vlab):
    L, _ = vlab
    pods = [p for p in L.pods if p.node == "n1"]
    assert len(pods) == 4
    api = client(None, f"{L.name}/n1")
    rng = random.Random(20261130)
    checked = 0
    for rnd in range(ROUNDS):
        before = mesh.agent_status(L, "n1")["control"]["config_version"]
        docs = _policies(rng, pods)
        write_registry(L, "random-policies", docs)
        wait_for(lambda b=before: mesh.agent_status(L, "n1")["control"]["config_version"] != b,
                 15, what="the new policies on n1")  # fmt: skip
        st = mesh.agent_status(L, "n1")["same_node"]
        assert st["mode"] == "direct" and not st["left_out"], st
        for src in pods:
            tries = [{"op": "tcp", "host": d.ip, "port": port, "timeout": 2}
                     for d in pods if d is not src for port in PORTS]  # fmt: skip
            r = L.run(src.name, [*helper("probe"), json.dumps(tries)])
            got = [json.loads(line)["result"] for line in r.stdout.splitlines()]
            for t, res in zip(tries, got, strict=True):
                dst = next(p for p in pods if p.ip == t["host"])
                want = api.get(
                    "/policy/check",
                    {"from": f"default/{src.name}", "to": f"default/{dst.name}", "port": t["port"]},
                )
                kernel = {"error EPERM": "deny", "error ECONNREFUSED": "allow"}.get(res, res)
                assert kernel == want["verdict"], (rnd, src.name, dst.name, t["port"], res, want,
                                                   docs)  # fmt: skip
                checked += 1
    assert checked == ROUNDS * 4 * 3 * len(PORTS)
    write_registry(L, "random-policies", [])
