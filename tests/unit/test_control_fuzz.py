"""Control-plane messages made hostile by hypothesis, over real gRPC and TLS on loopback.

A joined node (or anyone, on the join port) sends requests with arbitrary fields: strings of any
content (non-ASCII, '..', huge), CSRs that are not CSRs, raw bytes that are not protobuf. The
control plane answers each with a clear refusal (INVALID_ARGUMENT, UNAUTHENTICATED,
PERMISSION_DENIED, NOT_FOUND), never UNKNOWN or INTERNAL (a crash in a handler), and goes on
serving the next good request.
"""

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.control import ca as camod
from agent.control.proto import control_pb2 as pb
from agent.control.proto import control_pb2_grpc as pbg
from tests.helpers.grpcio import node_channel as control_channel
from tests.unit.test_control_grpc import _join, env  # noqa: F401 (the fixture)

REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
}
text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["..", "../identity", "web-1", "shop", "n1", "caf\u00e9", "a" * 300, ""]),
)
blob = st.one_of(st.binary(max_size=200), st.sampled_from([b"", b"-----BEGIN CERTIFICATE-----"]))
SETTINGS = dict(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def joined(env):  # noqa: F811
    loop, srv, _ = env
    key, cert = _join(loop, srv, "n1", srv.cp.tokens.create("n1", 60))
    return loop, srv, key, cert


def _code(loop, coro) -> grpc.StatusCode:
    try:
        loop.run_until_complete(coro)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        return e.code()


@settings(**SETTINGS)
@given(ns=text, name=text, csr=blob)
def test_sign_workload_with_any_fields_is_refused_clearly(joined, ns, name, csr):
    loop, srv, key, cert = joined

    async def go():
        async with control_channel(
            f"127.0.0.1:{srv.control_port}", srv.cp.ca.bundle_pem(), key, cert.cert_chain_pem
        ) as ch:
            await pbg.ControlStub(ch).SignWorkload(
                pb.SignWorkloadRequest(namespace=ns, name=name, csr_pem=csr), timeout=5
            )

    assert _code(loop, go()) in REFUSALS


@settings(**SETTINGS)
@given(node=text, token=text, csr=blob, address=text)
def test_join_with_any_fields_is_refused_clearly(joined, node, token, csr, address):
    loop, srv, _key, _cert = joined

    async def go():
        creds = grpc.ssl_channel_credentials(root_certificates=srv.cp.ca.bundle_pem())
        async with grpc.aio.secure_channel(f"127.0.0.1:{srv.join_port}", creds) as ch:
            await pbg.JoinStub(ch).Join(
                pb.JoinRequest(node=node, token=token, csr_pem=csr, address=address), timeout=5
            )

    assert _code(loop, go()) in REFUSALS


@settings(**SETTINGS)
@given(data=st.binary(max_size=300), method=st.sampled_from(["SignWorkload", "RenewNode"]))
def test_bytes_that_are_not_a_message_are_refused_and_serving_goes_on(joined, data, method):
    loop, srv, key, cert = joined

    async def go():
        async with control_channel(
            f"127.0.0.1:{srv.control_port}", srv.cp.ca.bundle_pem(), key, cert.cert_chain_pem
        ) as ch:
            raw = ch.unary_unary(f"/dabba.control.v1.Control/{method}")
            try:
                await raw(data, timeout=5)
                got = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                got = e.code()
            good = await pbg.ControlStub(ch).SignWorkload(
                pb.SignWorkloadRequest(
                    namespace="shop",
                    name="web-1",
                    csr_pem=camod.make_csr(
                        camod.new_key(), "spiffe://cluster.local/ns/shop/sa/web"
                    ),
                ),
                timeout=5,
            )
            return got, good

    got, good = loop.run_until_complete(go())
    assert got in REFUSALS | {grpc.StatusCode.OK}, got  # bytes may happen to parse
    assert good.spiffe_id.endswith("/sa/web")


def test_the_fuzzing_reaches_every_rpc():
    assert set(pb.DESCRIPTOR.services_by_name["Control"].methods_by_name) == {
        "SignWorkload",
        "RenewNode",
        "Watch",  # a stream: its request is the one field have_version, refused when malformed
    }
