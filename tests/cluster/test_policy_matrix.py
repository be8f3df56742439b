"""Istio AuthorizationPolicy and PeerAuthentication, each case checked with a real connection.

Pods: web (front) and api (back) on n1; db (back), ext (other) and an
unmeshed pod "plain" (other, not in the registry: plaintext) on n2. Every
case writes Istio YAML into the registry, waits until the enforcing tunnel
holds exactly those policies, then connects with curl. Same-node cases are
decided by the source node's tunnel before the splice, cross-node ones by
the destination node's tunnel on HBONE, plaintext ones by the kernel's
ingress guard (STRICT).
"""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from agent.lab import lab as labmod
from agent.lab import mesh
from agent.lab.spec import ClusterSpec, PodSpec
from tests.conftest import http_server, tunnel_stats, unique, wait_for, wait_port

PODS = [
    PodSpec(name="web", node="n1", namespace="front", service_account="web", labels={"app": "web"}),
    PodSpec(name="api", node="n1", namespace="back", service_account="api", labels={"app": "api"}),
    PodSpec(name="db", node="n2", namespace="back", service_account="db", labels={"app": "db"}),
    PodSpec(name="ext", node="n2", namespace="other", service_account="ext", labels={"app": "ext"}),
    PodSpec(name="plain", node="n2", namespace="other", service_account="plain"),
]
NODE_OF = {p.name: p.node for p in PODS}


@pytest.fixture(scope="module")
def plab():
    name = unique("pm")
    L = labmod.up(name, ClusterSpec(2, PODS))
    procs = []
    try:
        mesh_procs = mesh.up(L, capture=True)
        reg = os.path.join(mesh.paths(L)["registry"], "lab.yaml")
        with open(reg) as f:
            docs = [d for d in yaml.safe_load_all(f) if d["metadata"]["name"] != "plain"]
        with open(reg, "w") as f:
            yaml.safe_dump_all(docs, f, sort_keys=False)  # plain leaves the mesh
        wait_for(
            lambda: set(mesh.agent_status(L, "n2")["workloads"].values())
            == {"back/db", "other/ext"},
            20,
            what="plain to be unenrolled",
        )
        for pod in ("web", "api", "db"):
            for port in (8080, 9090):
                http_server(L, procs, L.pod(pod), port)
            p = L.pod(pod)
            procs.append(
                L.popen(
                    pod,
                    ["socat", f"TCP-LISTEN:7070,bind={p.ip},fork,reuseaddr", "SYSTEM:sleep 60"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            wait_port(L, pod, p.ip, 7070)
        yield L, mesh_procs
    finally:
        for p in procs:
            p.kill()
        labmod.down(name, quiet=True)


def _policies(L, node) -> set[str]:
    r = L.run(node, ["curl", "-s", "--max-time", "2", "http://127.0.0.1:15000/config_dump"])
    return {p["name"] for p in json.loads(r.stdout)["policies"]}


def _modes(L, node) -> dict[str, str]:
    r = L.run(node, ["curl", "-s", "--max-time", "2", "http://127.0.0.1:15000/config_dump"])
    return {w["name"]: w["mtls_mode"] for w in json.loads(r.stdout)["local_workloads"]}


def _apply(L, text: str, want: dict[str, set[str]]) -> None:
    path = os.path.join(mesh.paths(L)["registry"], "matrix.yaml")
    if text:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    elif os.path.exists(path):
        os.unlink(path)
    for node in ("n1", "n2"):
        keys = want.get(node, set())
        wait_for(lambda n=node, k=keys: _policies(L, n) == k, 15, what=f"{node} policies {keys}")


def _connects(L, src: str, dst: str, port: int) -> bool:
    r = L.run(
        src,
        [
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
            "--connect-timeout", "2", "--max-time", "3",
            f"http://{L.pod(dst).ip}:{port}/",
        ],
        check=False,
    )  # fmt: skip
    return r.returncode == 0 and r.stdout == "200"


def _ap(name, ns, action, rules, selector=None):
    spec = {"action": action, "rules": rules}
    if selector:
        spec["selector"] = {"matchLabels": {"app": selector}}
    return yaml.safe_dump(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        },
        sort_keys=False,
    )


def _from(**source):
    return {"from": [{"source": source}]}


WEB = "cluster.local/ns/front/sa/web"

# (case, policies, {node: policy keys it must hold}, [(src, dst, port, allowed)])
CASES = [
    ("no policy: everything allowed", "", {}, [("web", "db", 8080, True), ("ext", "api", 8080, True)]),
    (
        "ALLOW by principal",
        _ap("db-allow-web", "back", "ALLOW", [_from(principals=[WEB])], "db"),
        {"n2": {"back/db-allow-web"}},
        [("web", "db", 8080, True), ("ext", "db", 8080, False), ("api", "db", 8080, False)],
    ),
    (
        "DENY by namespace",
        _ap("db-deny-other", "back", "DENY", [_from(namespaces=["other"])], "db"),
        {"n2": {"back/db-deny-other"}},
        [("ext", "db", 8080, False), ("web", "db", 8080, True)],
    ),
    (
        "ALLOW with notPorts",
        _ap("db-not-9090", "back", "ALLOW", [{"to": [{"operation": {"notPorts": ["9090"]}}]}], "db"),
        {"n2": {"back/db-not-9090"}},
        [("web", "db", 8080, True), ("web", "db", 9090, False)],
    ),
    (
        "ALLOW by ipBlocks (the source workload's address, on the node and across)",
        _ap("api-from-web-ip", "back", "ALLOW", [_from(ipBlocks=["{web}/32"])], "api"),
        {"n1": {"back/api-from-web-ip"}},
        [("web", "api", 8080, True), ("ext", "api", 8080, False)],
    ),
    (
        "ALLOW with notIpBlocks",
        _ap("api-not-ext", "back", "ALLOW", [_from(notIpBlocks=["{ext}/32"])], "api"),
        {"n1": {"back/api-not-ext"}},
        [("web", "api", 8080, True), ("ext", "api", 8080, False)],
    ),
    (
        "an ALLOW that matches nothing denies everything it applies to",
        _ap("api-nobody", "back", "ALLOW", [_from(principals=["cluster.local/ns/x/sa/nobody"])], "api"),
        {"n1": {"back/api-nobody"}},
        [("web", "api", 8080, False), ("web", "db", 8080, True)],
    ),
    (
        "DENY overrides ALLOW",
        _ap("db-allow-web", "back", "ALLOW", [_from(principals=[WEB])], "db")
        + "---\n"
        + _ap("db-deny-8080", "back", "DENY", [{"to": [{"operation": {"ports": ["8080"]}}]}], "db"),
        {"n2": {"back/db-allow-web", "back/db-deny-8080"}},
        [("web", "db", 8080, False), ("web", "db", 9090, True)],
    ),
    (
        "a rule with an L7 field fails safe: ALLOW never matches",
        _ap("db-get-only", "back", "ALLOW", [{"to": [{"operation": {"methods": ["GET"]}}]}], "db"),
        {"n2": {"back/db-get-only"}},
        [("web", "db", 8080, False)],
    ),
    (
        "a rule with an L7 field fails safe: DENY always matches",
        _ap("api-deny-admin", "back", "DENY", [{"to": [{"operation": {"paths": ["/admin"]}}]}], "api"),
        {"n1": {"back/api-deny-admin"}},
        [("web", "api", 8080, False), ("web", "db", 8080, True)],
    ),
    (
        "namespace scope: no selector applies to every workload of the namespace",
        _ap("back-from-front", "back", "ALLOW", [_from(namespaces=["front"])]),
        {"n1": {"back/back-from-front"}, "n2": {"back/back-from-front"}},
        [("web", "api", 8080, True), ("web", "db", 8080, True), ("ext", "db", 8080, False),
         ("api", "db", 8080, False)],
    ),
    (
        "mesh-wide: the root namespace applies everywhere",
        _ap("no-other", "istio-system", "DENY", [_from(notNamespaces=["front", "back"])]),
        {"n1": {"istio-system/no-other"}, "n2": {"istio-system/no-other"}},
        [("ext", "web", 8080, False), ("ext", "db", 8080, False), ("web", "db", 8080, True)],
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_authorization_policy_case(plab, case):
    L, _ = plab
    _, text, want, checks = case
    text = text.replace("{web}", L.pod("web").ip).replace("{ext}", L.pod("ext").ip)
    _apply(L, text, want)
    got = [(s, d, p, _connects(L, s, d, p)) for s, d, p, _ in checks]
    assert got == checks
    # `dabba policy check` on the destination's node agrees with every real connection
    explained = [(s, d, p, _policy_check(L, s, d, p)) for s, d, p, _ in checks]
    assert explained == checks


def _policy_check(L, src: str, dst: str, port: int) -> bool:
    node = L.pod(dst).node
    r = subprocess.run(
        [
            sys.executable, "-m", "agent.cli", "policy", "check", "--node", f"{L.name}/{node}",
            "--from", src, "--to", dst, "--port", str(port), "-o", "json",
        ],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode in (0, 3), r.stderr
    doc = json.loads(r.stdout)
    assert (doc["verdict"] == "allow") == (r.returncode == 0)
    assert doc["reason"], doc
    if doc["verdict"] == "deny" or doc["policy"]:
        assert doc["reason"].startswith(("denied", "allowed by ALLOW policy")), doc
    return doc["verdict"] == "allow"


def _peer_auth(mode: str, ports: dict[int, str] | None = None) -> str:
    spec = {"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": mode}}
    if ports:
        spec["portLevelMtls"] = {p: {"mode": m} for p, m in ports.items()}
    return yaml.safe_dump(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "db-mtls", "namespace": "back"},
            "spec": spec,
        }
    )


def _port_modes(L, node) -> dict[str, dict]:
    r = L.run(node, ["curl", "-s", "--max-time", "2", "http://127.0.0.1:15000/config_dump"])
    return {w["name"]: w["port_mtls"] for w in json.loads(r.stdout)["local_workloads"]}


@pytest.mark.parametrize(
    "mode,plaintext_allowed", [("STRICT", False), ("PERMISSIVE", True), ("DISABLE", True)]
)
def test_peer_authentication_plaintext(plab, mode, plaintext_allowed):
    """plain is outside the mesh: its connection to db is plaintext; web's is mutual TLS."""
    L, _ = plab
    _apply(L, _peer_auth(mode), {})
    wait_for(lambda: _modes(L, "n2").get("db") == mode, 15, what=f"db in {mode}")
    time.sleep(1.5)  # the agent re-enrols db with the new guard flag on its next snapshot
    drops = _guard_drops(L)
    before = tunnel_stats(L, "n2").get("plain_inbound", 0)
    assert _connects(L, "plain", "db", 8080) is plaintext_allowed
    assert _connects(L, "web", "db", 8080)  # mutual TLS through the tunnels: always fine
    assert (_guard_drops(L) > drops) is (not plaintext_allowed)  # STRICT: dropped and counted
    # PERMISSIVE and DISABLE: the plaintext went through the tunnel's 15006 (steered by sk_lookup)
    assert tunnel_stats(L, "n2").get("plain_inbound", 0) - before == int(plaintext_allowed)
    _apply(L, "", {})


def test_plaintext_to_a_permissive_workload_is_held_to_its_policy(plab):
    """Plaintext has no identity: a principal or namespace rule never admits it, an ipBlock can."""
    L, _ = plab
    _apply(L, _peer_auth("PERMISSIVE"), {})
    plain_ip = L.pod("plain").ip
    front_only = _ap("db-front", "back", "ALLOW", [_from(namespaces=["front"])], "db")
    _apply(L, _peer_auth("PERMISSIVE") + "---\n" + front_only, {"n2": {"back/db-front"}})
    time.sleep(1)
    assert not _connects(L, "plain", "db", 8080)  # no identity, no namespace: denied at 15006
    assert _connects(L, "web", "db", 8080)
    by_ip = _ap("db-plain-ip", "back", "ALLOW", [_from(ipBlocks=[f"{plain_ip}/32"])], "db")
    _apply(L, _peer_auth("PERMISSIVE") + "---\n" + by_ip, {"n2": {"back/db-plain-ip"}})
    assert _connects(L, "plain", "db", 8080)
    assert not _connects(L, "web", "db", 8080)  # web's address is not in the block
    stats = tunnel_stats(L, "n2")
    assert stats.get("plain_denied", 0) >= 1 and stats.get("plain_inbound", 0) >= 1
    _apply(L, "", {})


def _guard_drops(L) -> int:
    from agent.bpf.control import DatapathControl
    from agent.bpf.loader import Datapath

    n = L.node("n2")
    return DatapathControl(Datapath(n.bpf_node, n.cgroup)).stats()["guard_drop"]


_HOLD = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], 7070), timeout=5)
s.sendall(b"hello")
print("open", flush=True)
s.settimeout(30)
t = time.monotonic()
try:
    data = s.recv(10)
    print("closed", repr(data), flush=True)
except ConnectionResetError:
    print("reset", flush=True)
except TimeoutError:
    print("still open", flush=True)
"""


def test_policy_recheck_closes_established_flows_a_new_policy_denies(plab):
    L, _ = plab
    _apply(L, "", {})
    held = {}
    for src, dst in (("web", "db"), ("web", "api"), ("ext", "db")):  # across, on the node, across
        p = L.popen(src, ["python3", "-c", _HOLD, L.pod(dst).ip], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "open"
        held[(src, dst)] = p
    time.sleep(0.5)
    t0 = time.monotonic()
    deny_web = (
        _ap("db-no-web", "back", "DENY", [_from(principals=[WEB])], "db")
        + "---\n"
        + _ap("api-no-web", "back", "DENY", [_from(principals=[WEB])], "api")
    )
    _apply(L, deny_web, {"n1": {"back/api-no-web"}, "n2": {"back/db-no-web"}})
    out = {k: p.communicate(timeout=15)[0].strip() for k, p in held.items() if k[0] == "web"}
    print(f"\nestablished flows closed {time.monotonic() - t0:.2f}s after the policy was written")
    print(out)
    # both were reset (the HBONE one and the spliced one), not left to time out
    assert out == {("web", "db"): "reset", ("web", "api"): "reset"}
    # a flow the new policy still allows stays open
    assert held[("ext", "db")].poll() is None
    held[("ext", "db")].kill()
    _apply(L, "", {})


def test_a_change_to_strict_ends_established_plaintext_flows(plab):
    """Before: policy recheck ran on policy changes only, so a workload switched to STRICT
    kept its plaintext flows (through 15006) running."""
    L, _ = plab
    _apply(L, _peer_auth("PERMISSIVE"), {})
    wait_for(lambda: _modes(L, "n2").get("db") == "PERMISSIVE", 15, what="db in PERMISSIVE")
    time.sleep(1.5)  # the agent steers db's plaintext to 15006 on its next snapshot
    closed = tunnel_stats(L, "n2").get("recheck_closed", 0)
    held = {}
    for src in ("plain", "web"):  # plaintext from outside the mesh; mutual TLS from web
        p = L.popen(
            src, ["python3", "-c", _HOLD, L.pod("db").ip], stdout=subprocess.PIPE, text=True
        )
        assert p.stdout.readline().strip() == "open"
        held[src] = p
    _apply(L, _peer_auth("STRICT"), {})
    assert held["plain"].communicate(timeout=15)[0].strip() == "reset"
    assert held["web"].poll() is None  # mutual TLS is what STRICT asks for: it stays
    held["web"].kill()
    assert tunnel_stats(L, "n2").get("recheck_closed", 0) == closed + 1
    _apply(L, "", {})


@pytest.mark.parametrize(
    "mode,ports",
    [("STRICT", {8080: "PERMISSIVE"}), ("PERMISSIVE", {9090: "STRICT"})],
    ids=["strict-with-a-permissive-port", "permissive-with-a-strict-port"],
)
def test_port_level_mtls_is_enforced_per_port(plab, mode, ports):
    """Before: portLevelMtls reached the nodes and was never enforced (the whole workload
    followed its own mode). Now 8080 takes plaintext (through 15006, policy applied) and 9090
    does not (dropped and counted by the guard), whichever of the two the workload's mode is."""
    L, _ = plab
    _apply(L, _peer_auth(mode, ports), {})
    want = {str(p): m for p, m in ports.items()}
    wait_for(
        lambda: _modes(L, "n2").get("db") == mode and _port_modes(L, "n2").get("db") == want,
        15,
        what=f"db in {mode} with {want}",
    )
    time.sleep(1.5)  # the agent writes the port modes and steering on its next snapshot
    drops = _guard_drops(L)
    inbound = tunnel_stats(L, "n2").get("plain_inbound", 0)
    assert _connects(L, "plain", "db", 8080)
    assert not _connects(L, "plain", "db", 9090)
    assert _connects(L, "web", "db", 8080) and _connects(L, "web", "db", 9090)  # mutual TLS
    assert _guard_drops(L) > drops  # 9090's SYNs
    assert tunnel_stats(L, "n2").get("plain_inbound", 0) == inbound + 1  # 8080, through 15006
    _apply(L, "", {})
