"""The control plane's gRPC services, for real on loopback (TLS, tokens, authorization, watch).

No root needed: the server listens on 127.0.0.1 with ports from the kernel. The calls go through
the agent's own client (agent/node/rpc.py), as the agent makes them, against grpcio's server;
a join through grpcio's client too.
"""

import asyncio
import time

import grpc
import pytest
from cryptography import x509

from agent.control import ca as camod
from agent.control.proto import control_pb2 as pb
from agent.control.proto import control_pb2_grpc as pbg
from agent.errors import DabbaError
from agent.node import rpc
from agent.node.control_client import join
from tests.conftest import control_server

REG = """\
apiVersion: dabbawala.io/v1
kind: Workload
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {serviceAccount: web, node: n1, ip: 10.20.1.11, cgroup: /sys/fs/cgroup/unified/x/web-1}
---
apiVersion: dabbawala.io/v1
kind: Workload
metadata: {name: db-1, namespace: shop, labels: {app: db}}
spec: {serviceAccount: db, node: n2, ip: 10.20.2.11}
---
apiVersion: dabbawala.io/v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {vip: 10.96.0.10, ports: [80], selector: {app: web}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-only, namespace: shop}
spec: {selector: {matchLabels: {app: web}}, action: ALLOW, rules: [{to: [{operation: {ports: ["80"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-only, namespace: shop}
spec: {selector: {matchLabels: {app: db}}, action: DENY, rules: [{}]}
"""


@pytest.fixture
def env(tmp_path):
    with control_server(tmp_path, REG) as (loop, srv):
        yield loop, srv, tmp_path


def _join(loop, srv, node, token, ca=None):
    ca = ca or srv.cp.ca.bundle_pem()
    return loop.run_until_complete(
        join(f"127.0.0.1:{srv.join_port}", ca, node, token, f"10.10.0.1{node[-1]}")
    )


def _channel(srv, key: bytes, chain: bytes):
    """The agent's channel to the control port, with the node's key and chain as files (where
    the agent reads them)."""
    import tempfile

    d = tempfile.mkdtemp()
    for name, pem in (("key.pem", key), ("chain.pem", chain)):
        with open(f"{d}/{name}", "wb") as f:
            f.write(pem)
    return rpc.Channel(
        f"127.0.0.1:{srv.control_port}", srv.cp.ca.bundle_pem(), f"{d}/chain.pem", f"{d}/key.pem"
    )


def _call(loop, srv, key, chain, fn):
    async def go():
        async with _channel(srv, key, chain) as ch:
            return await fn(rpc.ControlStub(ch))

    return loop.run_until_complete(go())


def test_join_then_sign_only_own_workloads(env, caplog):
    loop, srv, tmp = env
    t1 = srv.cp.tokens.create("n1", 3600)
    key, cert = _join(loop, srv, "n1", t1)
    assert cert.trust_domain == "cluster.local"
    from cryptography import x509

    leaf = x509.load_pem_x509_certificate(cert.cert_chain_pem)
    assert camod.spiffe_ids_of(leaf) == ["spiffe://cluster.local/node/n1"]

    wkey = camod.new_key()
    uri = "spiffe://cluster.local/ns/shop/sa/web"
    resp = _call(
        loop,
        srv,
        key,
        cert.cert_chain_pem,
        lambda s: s.SignWorkload(
            pb.SignWorkloadRequest(
                namespace="shop", name="web-1", csr_pem=camod.make_csr(wkey, uri)
            )
        ),
    )
    assert resp.spiffe_id == uri
    assert camod.spiffe_ids_of(x509.load_pem_x509_certificate(resp.cert_chain_pem)) == [uri]
    # the workload's key stayed here: the control plane's state holds no private key but its own CA's
    keys = [
        p for p in (tmp / "state").rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()
    ]
    assert [p.name for p in keys] == ["signing-key.pem"]

    # n1 asking for db-1, scheduled on n2: refused, and logged with node and identity
    db = "spiffe://cluster.local/ns/shop/sa/db"
    with pytest.raises(rpc.RpcError) as e:
        _call(
            loop,
            srv,
            key,
            cert.cert_chain_pem,
            lambda s: s.SignWorkload(
                pb.SignWorkloadRequest(
                    namespace="shop", name="db-1", csr_pem=camod.make_csr(camod.new_key(), db)
                )
            ),
        )
    assert e.value.code() == rpc.StatusCode.PERMISSION_DENIED
    assert "node n1 may not obtain spiffe://cluster.local/ns/shop/sa/db" in e.value.details()
    assert any(
        "node=n1" in r.getMessage() and f"identity={db}" in r.getMessage() for r in caplog.records
    )

    # a CSR with two SANs for its own workload: refused with the reason
    from cryptography import x509 as x
    from cryptography.hazmat.primitives import hashes, serialization

    two = (
        x.CertificateSigningRequestBuilder()
        .subject_name(x.Name([]))
        .add_extension(
            x.SubjectAlternativeName(
                [x.UniformResourceIdentifier(uri), x.UniformResourceIdentifier(db)]
            ),
            critical=True,
        )
        .sign(wkey, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(rpc.RpcError) as e:
        _call(
            loop,
            srv,
            key,
            cert.cert_chain_pem,
            lambda s: s.SignWorkload(
                pb.SignWorkloadRequest(namespace="shop", name="web-1", csr_pem=two)
            ),
        )
    assert e.value.code() == rpc.StatusCode.INVALID_ARGUMENT and "it names 2" in e.value.details()


def test_token_reuse_expiry_and_wrong_node_are_refused(env):
    loop, srv, _ = env
    t = srv.cp.tokens.create("n1", 3600)
    _join(loop, srv, "n1", t)
    with pytest.raises(DabbaError, match="UNAUTHENTICATED: join token .* was already used"):
        _join(loop, srv, "n1", t)
    t2 = srv.cp.tokens.create("n2", 0.2)
    time.sleep(0.4)
    with pytest.raises(DabbaError, match="UNAUTHENTICATED: join token .* expired"):
        _join(loop, srv, "n2", t2)
    t3 = srv.cp.tokens.create("n2", 3600)
    with pytest.raises(DabbaError, match="is for node 'n2', not 'n3'"):
        _join(loop, srv, "n3", t3)


def test_a_join_that_fails_does_not_burn_its_token(env):
    """Before: the token was marked used before the CSR was checked, so a join with a bad CSR
    (or another node's identity) left the node unable to join with its token."""
    loop, srv, _ = env
    t = srv.cp.tokens.create("n1", 3600)
    other = camod.make_csr(camod.new_key(), "spiffe://cluster.local/node/n2")  # not n1's

    async def bad(csr):
        creds = grpc.ssl_channel_credentials(root_certificates=srv.cp.ca.bundle_pem())
        async with grpc.aio.secure_channel(f"127.0.0.1:{srv.join_port}", creds) as ch:
            await pbg.JoinStub(ch).Join(pb.JoinRequest(node="n1", token=t, csr_pem=csr))

    for csr in (b"not a CSR", other):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            loop.run_until_complete(bad(csr))
        assert (
            e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "node CSR" in e.value.details()
        )
    _key, cert = _join(loop, srv, "n1", t)  # the token still works, once
    assert cert.cert_chain_pem
    with pytest.raises(DabbaError, match="was already used"):
        _join(loop, srv, "n1", t)


def test_control_port_requires_a_node_certificate(env):
    loop, srv, tmp = env
    other = camod.CA.load_or_create(
        str(tmp / "other"), "cluster.local"
    )  # another CA, same trust domain
    k = camod.new_key()
    fake = other.issue(
        camod.make_csr(k, "spiffe://cluster.local/node/n1"), "spiffe://cluster.local/node/n1"
    )
    with pytest.raises(rpc.RpcError) as e:
        _call(
            loop,
            srv,
            camod.key_pem(k),
            fake.chain_pem,
            lambda s: s.SignWorkload(
                pb.SignWorkloadRequest(namespace="shop", name="web-1", csr_pem=b"x"), timeout=5
            ),
        )
    assert e.value.code() == rpc.StatusCode.UNAVAILABLE  # the TLS handshake fails


def test_garbage_message_is_an_error_not_a_crash(env):
    loop, srv, _ = env
    key, cert = _join(loop, srv, "n1", srv.cp.tokens.create("n1", 60))

    async def go():
        async with _channel(srv, key, cert.cert_chain_pem) as ch:

            class Raw:
                def SerializeToString(self):
                    return b"\xff\xff\xff\xff garbage \x00\x01"

            with pytest.raises(rpc.RpcError) as e:
                await ch.unary(rpc.SIGN, Raw(), pb.WorkloadCertificate, timeout=5)
            assert e.value.code() == rpc.StatusCode.INVALID_ARGUMENT
            assert "malformed dabba.control.v1.SignWorkloadRequest" in e.value.details()
            # still serving
            return await rpc.ControlStub(ch).SignWorkload(
                pb.SignWorkloadRequest(
                    namespace="shop",
                    name="web-1",
                    csr_pem=camod.make_csr(
                        camod.new_key(), "spiffe://cluster.local/ns/shop/sa/web"
                    ),
                ),
                timeout=5,
            )

    assert loop.run_until_complete(go()).spiffe_id.endswith("/sa/web")


def test_watch_gives_a_filtered_snapshot_then_updates_on_registry_change(env):
    loop, srv, tmp = env
    key, cert = _join(loop, srv, "n1", srv.cp.tokens.create("n1", 60))

    async def go():
        async with _channel(srv, key, cert.cert_chain_pem) as ch:
            stream = rpc.ControlStub(ch).Watch(pb.WatchRequest(have_version=0))
            first = await anext(stream)
            reg = tmp / "registry" / "mesh.yaml"
            t0 = time.monotonic()
            reg.write_text(reg.read_text().replace('ports: ["80"]', 'ports: ["8080"]'))
            second = await asyncio.wait_for(anext(stream), 10)
            await stream.aclose()
            return first, second, time.monotonic() - t0

    first, second, dt = loop.run_until_complete(go())
    assert second.version > first.version
    assert {w.name for w in first.workloads} == {"web-1", "db-1"}
    web = next(w for w in first.workloads if w.name == "web-1")
    db = next(w for w in first.workloads if w.name == "db-1")
    assert web.cgroup == "/sys/fs/cgroup/unified/x/web-1" and db.cgroup == ""  # local only
    assert [p.name for p in first.policies] == [
        "web-only"
    ]  # db-only applies to n2's workload, not sent
    assert first.services[0].endpoints == ["shop/web-1"] and first.nodes[0].name == "n1"
    assert first.root_namespace == "istio-system"  # the nodes scope policies by it
    assert list(second.policies[0].rules[0].operations[0].ports) == [8080]
    assert dt < 5


def test_a_revoked_node_is_refused_and_its_certificates_are_told_to_every_node(env):
    """Before: RenewNode renewed any valid node certificate forever and nothing could be
    revoked. Now `dabba control node revoke` ends its stream, refuses its RPCs and joins, and
    every other node's snapshot lists the serials of its certificates (HBONE refuses them)."""
    from agent.control.revocation import RevokedNodes

    loop, srv, tmp = env
    k1, c1 = _join(loop, srv, "n1", srv.cp.tokens.create("n1", 60))
    k2, c2 = _join(loop, srv, "n2", srv.cp.tokens.create("n2", 60))

    async def sign(stub):
        csr = camod.make_csr(camod.new_key(), "spiffe://cluster.local/ns/shop/sa/web")
        return await stub.SignWorkload(
            pb.SignWorkloadRequest(namespace="shop", name="web-1", csr_pem=csr), timeout=10
        )

    web = _call(loop, srv, k1, c1.cert_chain_pem, sign)  # n1 holds web-1's certificate

    async def watch_until_refused():
        async with _channel(srv, k1, c1.cert_chain_pem) as ch:
            stream = rpc.ControlStub(ch).Watch(pb.WatchRequest(have_version=0))
            await anext(stream)
            assert RevokedNodes(str(tmp / "state")).revoke("n1")  # as the CLI does
            with pytest.raises(rpc.RpcError) as e:
                while True:
                    await asyncio.wait_for(anext(stream), 10)
            return e.value

    err = loop.run_until_complete(watch_until_refused())
    assert err.code() == rpc.StatusCode.PERMISSION_DENIED and "node n1 is revoked" in err.details()

    async def renew(stub):
        csr = camod.make_csr(camod.new_key(), "spiffe://cluster.local/node/n1")
        return await stub.RenewNode(pb.RenewNodeRequest(csr_pem=csr), timeout=10)

    for fn in (renew, sign):
        with pytest.raises(rpc.RpcError) as e:
            _call(loop, srv, k1, c1.cert_chain_pem, fn)
        assert e.value.code() == rpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(DabbaError, match="node n1 is revoked"):
        _join(loop, srv, "n1", srv.cp.tokens.create("n1", 60))

    # n2 is told: n1's node and workload certificates, and n1 is no destination any more
    snap = srv.cp.snapshot_for("n2")
    n1_node_serial = format(x509.load_pem_x509_certificate(c1.cert_chain_pem).serial_number, "x")
    assert set(snap.revoked_serials) == {n1_node_serial, web.serial}
    assert [n.name for n in snap.nodes] == ["n2"]
    assert RevokedNodes(str(tmp / "state")).unrevoke("n1")
    srv.cp.revoked.reload()
    assert list(srv.cp.snapshot_for("n2").revoked_serials) == []
