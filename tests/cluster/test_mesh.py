"""Control plane and node agents in the lab: join, authorization, propagation, outage.

Everything is real: the control plane serves gRPC over TLS in the lab's own
namespace, agents join from node namespaces with one-time tokens.
Every agent runs its node's tunnel, so connections between pods go through
the mesh (HBONE across nodes, splice on a node).
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from agent.lab import lab as labmod
from agent.lab import mesh
from tests.conftest import helper, http_server, mesh_lab, read_json, wait_for

JOIN = """
import asyncio, sys
from agent.node.control_client import join
ca = open(sys.argv[1], "rb").read()
try:
    asyncio.run(join("10.10.0.1:15013", ca, sys.argv[2], sys.argv[3], "10.10.0.99"))
    print("joined")
except Exception as e:
    print("refused:", e)
"""

SIGN = """
import asyncio, sys
from agent.control import ca as camod
from agent.control.proto import control_pb2 as pb
from agent.node import rpc
from agent.node.identity import CertStore
key, chain, bundle = CertStore(sys.argv[1]).node_paths()
async def go():
    async with rpc.Channel("10.10.0.1:15012", open(bundle, "rb").read(), chain, key) as ch:
        csr = camod.make_csr(camod.new_key(), sys.argv[4])
        await rpc.ControlStub(ch).SignWorkload(pb.SignWorkloadRequest(namespace=sys.argv[2], name=sys.argv[3],
                                                                      csr_pem=csr), timeout=10)
try:
    asyncio.run(go()); print("signed")
except rpc.RpcError as e:
    print("refused:", e.code().name, e.details())
"""


@pytest.fixture(scope="module")
def meshlab():
    yield from mesh_lab("m", 2, 2, capture=True)


def _status(L, node):
    return mesh.agent_status(L, node)


def _py(L, target, code, *args):
    return L.run(
        target, [sys.executable, "-c", code, *map(str, args)], cwd=os.getcwd()
    ).stdout.strip()


def test_agents_join_and_hold_keys_and_certificates_for_their_own_pods(meshlab):
    L, _ = meshlab
    from cryptography import x509

    from agent.control import ca as camod

    for node in L.nodes:
        certs = _status(L, node.name)["control"]["certs"]
        assert set(certs) == {f"default/{p.name}" for p in L.pods_on(node.name)}
        for p in L.pods_on(node.name):
            d = os.path.join(labmod.STATE_DIR, L.name, node.name, "certs", "default", p.name)
            assert oct(os.stat(os.path.join(d, "key.pem")).st_mode & 0o777) == "0o600"
            with open(os.path.join(d, "chain.pem"), "rb") as f:
                leaf = x509.load_pem_x509_certificate(f.read())
            assert camod.spiffe_ids_of(leaf) == [
                f"spiffe://cluster.local/ns/default/sa/{p.service_account}"
            ]
    # the keys never left the nodes: the control plane's state holds only its CA key
    control = mesh.paths(L)["control"]
    keys = []
    for dirpath, _, files in os.walk(control):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                if b"PRIVATE KEY" in fh.read():
                    keys.append(f)
    assert keys == ["signing-key.pem"]


def test_reused_expired_and_foreign_tokens_are_refused(meshlab):
    L, _ = meshlab
    from agent.control.tokens import TokenStore

    p = mesh.paths(L)
    ca = os.path.join(p["control"], "ca", "bundle.pem")
    with open(os.path.join(p["root"], "n1.token")) as f:
        used = f.read().strip()
    assert "already used" in _py(L, "n1", JOIN, ca, "n1", used)
    short = TokenStore(p["control"]).create("n3", 1)
    time.sleep(1.5)
    assert "expired" in _py(L, "n1", JOIN, ca, "n3", short)
    fresh = TokenStore(p["control"]).create("n3", 60)
    assert "is for node 'n3', not 'n4'" in _py(L, "n1", JOIN, ca, "n4", fresh)
    assert _py(L, "n1", JOIN, ca, "n3", fresh) == "joined"


def test_node_cannot_obtain_a_certificate_for_another_nodes_workload(meshlab):
    L, _ = meshlab
    state = os.path.join(labmod.STATE_DIR, L.name, "n1")
    other = L.pod("n2-p1")
    uri = f"spiffe://cluster.local/ns/default/sa/{other.service_account}"
    out = _py(L, "n1", SIGN, state, "default", other.name, uri)
    assert out.startswith("refused: PERMISSION_DENIED")
    assert f"node n1 may not obtain {uri}" in out
    with open(os.path.join(mesh.paths(L)["logs"], "control.log")) as f:
        log = f.read()
    assert f"node=n1 identity={uri}" in log
    own = L.pod("n1-p1")
    assert (
        _py(
            L,
            "n1",
            SIGN,
            state,
            "default",
            own.name,
            f"spiffe://cluster.local/ns/default/sa/{own.service_account}",
        )
        == "signed"
    )


def test_policy_change_reaches_the_agent(meshlab):
    L, _ = meshlab
    reg = os.path.join(mesh.paths(L)["registry"], "policy.yaml")
    before = _status(L, "n1")["control"]["config_version"]
    t0 = time.monotonic()
    with open(reg, "w") as f:
        f.write(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            "metadata: {name: deny-p2, namespace: default}\n"
            "spec: {selector: {matchLabels: {app: n1-p2}}, action: DENY, rules: [{}]}\n"
        )
    snap_path = os.path.join(labmod.STATE_DIR, L.name, "n1", "snapshot.pb")

    def has_policy():
        from agent.control.proto import control_pb2 as pb

        with open(snap_path, "rb") as f:
            s = pb.Snapshot.FromString(f.read())
        return s.version > before and [p.name for p in s.policies] == ["deny-p2"] and s

    snap = wait_for(has_policy, 10, interval=0.01, what="the policy in the agent's snapshot")
    dt = time.monotonic() - t0
    print(f"\npolicy file change -> agent snapshot: {dt * 1000:.0f} ms")
    assert snap.policies[0].action == "DENY"
    # n2 has no workload the policy applies to: it is not sent there
    from agent.control.proto import control_pb2 as pb

    with open(os.path.join(labmod.STATE_DIR, L.name, "n2", "snapshot.pb"), "rb") as f:
        assert [p.name for p in pb.Snapshot.FromString(f.read()).policies] == []
    # a broken change is rejected, the last good state stays
    with open(reg, "w") as f:
        f.write(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\n"
            "spec: {action: NOPE}\n"
        )
    time.sleep(1.5)
    with open(snap_path, "rb") as f:
        assert [p.name for p in pb.Snapshot.FromString(f.read()).policies] == ["deny-p2"]
    with open(os.path.join(mesh.paths(L)["logs"], "control.log")) as f:
        assert "policy.yaml:4: action 'NOPE' is not one of" in f.read()
    os.unlink(reg)


def test_control_plane_outage_then_resync_without_agent_restart(meshlab):
    L, procs = meshlab
    agent_pid = _status(L, "n1")["pid"]
    version = _status(L, "n1")["control"]["config_version"]
    procs["control"].send_signal(signal.SIGTERM)
    assert procs["control"].wait(10) == 0
    wait_for(lambda: not _status(L, "n1")["control"]["connected"], 10, what="the agent to notice")
    # during the outage the node keeps its workloads enrolled; a connection opened before it
    # keeps flowing and new ones succeed, all through the mesh (HBONE to n2)
    enrolled = _status(L, "n1")["workloads"]
    srv = L.popen(
        "n2-p1",
        ["python3", "-m", "http.server", "8080", "--bind", L.pod("n2-p1").ip],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sink = L.popen(
        "n2-p2",
        [*helper("xfer"), "server", "--listen", f"{L.pod('n2-p2').ip}:9300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    read_json(sink, "listening")
    stream = L.popen(
        "n1-p2",
        [*helper("xfer"), "client", "--connect", f"{L.pod('n2-p2').ip}:9300", "--stream"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    captured = _status(L, "n1")["stats"]["captured"]
    try:
        time.sleep(1)
        outage = 120
        t_end = time.monotonic() + outage
        while time.monotonic() < t_end:
            r = L.run(
                "n1-p1",
                [
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    f"http://{L.pod('n2-p1').ip}:8080/",
                ],
            )
            assert r.stdout == "200"
            time.sleep(10)
    finally:
        srv.kill()
    stream.stdin.close()
    sent = read_json(stream, "sent")["sent"]
    assert (
        read_json(sink, "received")["received"] == sent > 120 / 0.02 * 65536 * 0.5
    )  # flowed throughout
    st = _status(L, "n1")
    assert st["stats"]["captured"] >= captured + 12  # the new connections were captured
    assert st["workloads"] == enrolled
    assert st["control"]["staleness_s"] >= outage
    assert st["stats"]["flow_closed"] > 0
    # the control plane comes back with its state (CA, nodes, tokens): the agent resyncs by itself
    procs["control"] = mesh.start_control(L)
    wait_for(lambda: _status(L, "n1")["control"]["connected"], 60, what="the agent to reconnect")
    st = _status(L, "n1")
    assert st["pid"] == agent_pid
    assert st["control"]["config_version"] > version and st["control"]["staleness_s"] < 5
    assert set(st["control"]["certs"]) == {"default/n1-p1", "default/n1-p2"}
    print(f"\nresynced at version {st['control']['config_version']} (was {version})")


@pytest.fixture(scope="module")
def shortlab():
    yield from mesh_lab("r", 2, 1, workload_ttl="60s", capture=True, node_ttl="60s")


def test_certificates_renew_at_half_life_while_connections_flow(shortlab, procs):
    """60 s certificates: across three renewals a connection opened before keeps flowing and
    new connections succeed; no renewal fails."""
    L, _ = shortlab
    first = {k: v["serial"] for k, v in _status(L, "n1")["control"]["certs"].items()}
    dst = L.pod("n2-p1")
    srv = http_server(L, procs, dst, 8080)  # listening before the first request
    sink = L.popen(
        dst.name,
        [*helper("xfer"), "server", "--listen", f"{dst.ip}:9400"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    read_json(sink, "listening")
    stream = L.popen(
        "n1-p1",
        [*helper("xfer"), "client", "--connect", f"{dst.ip}:9400", "--stream"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    failures = requests = 0
    try:
        deadline = time.monotonic() + 150
        while (
            time.monotonic() < deadline
            and min(_status(L, n)["control"]["renewals"] for n in ("n1", "n2")) < 3
        ):
            r = L.run(
                "n1-p1",
                [
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "5",
                    f"http://{dst.ip}:8080/",
                ],
                check=False,
            )
            requests += 1
            failures += r.stdout != "200"
            time.sleep(2)
    finally:
        srv.kill()
    stream.stdin.close()
    sent = read_json(stream, "sent", timeout=30)["sent"]
    assert read_json(sink, "received")["received"] == sent
    for n in ("n1", "n2"):
        st = _status(L, n)["control"]
        assert st["renewals"] >= 3 and st["failures"] == 0, st
        assert st["node_renewals"] >= 1  # 60 s node certificates are renewed too
    assert failures == 0 and requests >= 30
    assert all(_status(L, "n1")["control"]["certs"][k]["serial"] != v for k, v in first.items())
    # every key and CSR was made in a child process: the agents, having renewed workload and
    # node certificates, never loaded an X.509 library (agent/node/keygen.py)
    for n in ("n1", "n2"):
        with open(f"/proc/{_status(L, n)['pid']}/maps") as f:
            assert "/cryptography/" not in f.read()


OLD_ROOT_CLIENT = """
import asyncio, sys
from agent.ztunnel import hbone
svid, bundle, node_ip, authority, me, dst, mode = sys.argv[1:8]
async def go():
    pool = hbone.Pool("cluster.local", open(bundle, "rb").read(), lambda _i: (svid, svid))
    try:
        conn = await pool.get(me, dst, (node_ip, 15008))
        await conn.connect(authority, timeout=5)
    except Exception as e:
        print("refused", type(e).__name__, flush=True)
        return
    print("open", flush=True)
    if mode == "hold":
        await conn.closed
        print("closed", flush=True)
asyncio.run(go())
"""


def _line(proc, timeout: float) -> str:
    """The next line proc prints, or "" after timeout seconds."""
    import select

    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


def test_root_rotation_under_traffic_has_no_failed_connection(shortlab, procs, tmp_path):
    """...and the retired root is no longer trusted by running tunnels: a certificate it
    signed is refused at the handshake, and a connection made with one is closed (before: a
    tunnel's trust only grew until it restarted)."""
    L, _ = shortlab
    import shutil

    from cryptography import x509

    state = mesh.paths(L)["control"]
    dabba = [sys.executable, "-m", "agent.cli", "control", "ca"]
    dst = L.pod("n2-p1")
    srv = http_server(L, procs, dst, 8081)
    bundle = os.path.join(labmod.STATE_DIR, L.name, "n1", "identity", "bundle.pem")

    def roots():
        with open(bundle, "rb") as f:
            return x509.load_pem_x509_certificates(f.read())

    def from_new_root(chain_path):
        with open(chain_path, "rb") as f:
            leaf = x509.load_pem_x509_certificate(f.read())
        try:
            leaf.verify_directly_issued_by(roots()[-1])
        except Exception:
            return False
        return True

    def reissued(node):
        d = os.path.join(labmod.STATE_DIR, L.name, node, "certs", "default")
        return all(from_new_root(os.path.join(d, pod, "chain.pem")) for pod in os.listdir(d))

    failures = requests = 0
    failed, phase = [], "before"

    def request():
        nonlocal failures, requests
        r = L.run(
            "n1-p1",
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
                f"http://{dst.ip}:8081/",
            ],
            check=False,
        )
        requests += 1
        if r.stdout != "200":
            failures += 1
            failed.append((phase, r.returncode, r.stdout, r.stderr.strip()[-200:]))

    src, dst_pod = L.pod("n1-p1"), dst
    old_svid = str(tmp_path / "old-svid.pem")  # n1-p1's certificate from the old root
    shutil.copy(
        os.path.join(labmod.STATE_DIR, L.name, "n1", "certs", "default", src.name, "svid.pem"),
        old_svid,
    )
    two_roots = str(tmp_path / "two-roots.pem")  # what the client trusts: both roots

    def old_root_client(mode):
        return [sys.executable, "-c", OLD_ROOT_CLIENT, old_svid, two_roots, L.node("n2").ip,
                f"{dst_pod.ip}:8081", f"spiffe://cluster.local/ns/default/sa/{src.service_account}",
                f"spiffe://cluster.local/ns/default/sa/{dst_pod.service_account}", mode]  # fmt: skip

    try:
        time.sleep(1)
        request()
        # phase 1 (trust) now, phase 2 (sign) after 5 s
        phase = "rotating"
        subprocess.run(
            [*dabba, "rotate", "--state-dir", state, "--overlap", "5s"],
            check=True,
            capture_output=True,
        )
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and not (
            len(roots()) == 2 and reissued("n1") and reissued("n2")
        ):
            request()
            time.sleep(0.5)
        assert len(roots()) == 2 and reissued("n1") and reissued("n2")

        def node_reissued(node):  # before: only workload certificates were, so after the
            # retirement a node's own (old root) certificate locked it out of the control plane
            return from_new_root(
                os.path.join(labmod.STATE_DIR, L.name, node, "identity", "node-chain.pem")
            )

        wait_for(lambda: node_reissued("n1") and node_reissued("n2"), 15,
                 what="the nodes' own certificates from the new root")  # fmt: skip
        for _ in range(5):
            request()
        # a connection made with the old root's certificate, held open across the retirement
        shutil.copy(bundle, two_roots)
        held = L.popen("n1", old_root_client("hold"), stdout=subprocess.PIPE, text=True)
        procs.append(held)
        assert _line(held, 30) == "open"
        phase = "retired"
        subprocess.run([*dabba, "retire", "--state-dir", state], check=True, capture_output=True)
        wait_for(lambda: len(roots()) == 1, 10, what="the one-root bundle")
        for _ in range(5):
            request()
        assert _line(held, 15) == "closed"  # n2 closed it
        r = L.run("n1", old_root_client("once"), timeout=60)
        assert r.stdout.split()[0] == "refused", r.stdout  # and refuses a new one
    finally:
        srv.kill()
    assert failures == 0 and requests >= 12, failed
    assert _status(L, "n1")["control"]["failures"] == 0
