"""Who may take a waypoint's configuration from the control plane's ADS, for real over gRPC and
mutual TLS on loopback: the waypoint's own certificate (ns/<namespace>/sa/<name>, as Istio's
waypoints connect) from one of its pods' addresses, or the node of one of its pods; nobody else.

No root needed. The waypoint's pod is put at 127.0.0.1 in the registry, so that a call from
loopback comes from its address; its twin wp2's pod is elsewhere.
"""

import asyncio

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from agent.control import ca as camod
from agent.control.proto import control_pb2 as pb
from agent.control.proto import control_pb2_grpc as pbg
from agent.control.xds.ads import CDS, peer_ip
from agent.node.control_client import join
from tests.conftest import control_server
from tests.helpers.grpcio import node_channel as control_channel

REG = """\
apiVersion: dabbawala.io/v1
kind: Workload
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {serviceAccount: web, node: n1, ip: 10.20.1.11}
---
apiVersion: dabbawala.io/v1
kind: Workload
metadata:
  name: wp-1
  namespace: shop
  labels: {gateway.networking.k8s.io/gateway-name: wp}
spec: {serviceAccount: wp, node: n1, ip: 127.0.0.1}
---
apiVersion: dabbawala.io/v1
kind: Workload
metadata:
  name: wp2-1
  namespace: shop
  labels: {gateway.networking.k8s.io/gateway-name: wp2}
spec: {serviceAccount: wp2, node: n1, ip: 10.20.1.12}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: istio-waypoint}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp2, namespace: shop}
spec: {gatewayClassName: istio-waypoint}
"""


@pytest.fixture
def env(tmp_path):
    with control_server(tmp_path, REG) as (loop, srv):
        yield loop, srv


def _creds(loop, srv, node: str, pod: str | None):
    """(key, chain): node's own, or pod's as node's agent has it signed."""
    token = srv.cp.tokens.create(node, 3600)
    key, cert = loop.run_until_complete(
        join(f"127.0.0.1:{srv.join_port}", srv.cp.ca.bundle_pem(), node, token, "10.10.0.11")
    )
    if pod is None:
        return key, cert.cert_chain_pem
    sa = srv.cp.registry.state.workloads[f"shop/{pod}"].service_account
    wkey = camod.new_key()

    async def sign():
        async with control_channel(
            f"127.0.0.1:{srv.control_port}", srv.cp.ca.bundle_pem(), key, cert.cert_chain_pem
        ) as ch:
            return await pbg.ControlStub(ch).SignWorkload(pb.SignWorkloadRequest(
                namespace="shop", name=pod,
                csr_pem=camod.make_csr(wkey, f"spiffe://cluster.local/ns/shop/sa/{sa}")))  # fmt: skip

    return camod.key_pem(wkey), loop.run_until_complete(sign()).cert_chain_pem


def _ads(loop, srv, creds, waypoint: str):
    """The first response of an ADS stream asking for waypoint's clusters, or the RpcError."""
    key, chain = creds

    async def go():
        async with control_channel(
            f"127.0.0.1:{srv.control_port}", srv.cp.ca.bundle_pem(), key, chain
        ) as ch:
            req = discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=waypoint), type_url=CDS)
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources(
                iter([req])
            )
            try:
                return await asyncio.wait_for(call.read(), 10)
            finally:
                call.cancel()

    try:
        return loop.run_until_complete(go())
    except grpc.RpcError as e:
        return e


def test_a_waypoint_takes_its_configuration_with_its_own_certificate(env):
    loop, srv = env
    got = _ads(loop, srv, _creds(loop, srv, "n1", "wp-1"), "shop/wp")
    assert isinstance(got, discovery_pb2.DiscoveryResponse), got
    assert got.type_url == CDS and got.version_info
    assert srv.cp.ads.status["shop/wp"].node == "n1"  # the node its pod runs on


def test_a_node_running_one_of_its_pods_may_too(env):
    loop, srv = env
    got = _ads(loop, srv, _creds(loop, srv, "n1", None), "shop/wp")
    assert isinstance(got, discovery_pb2.DiscoveryResponse), got


@pytest.mark.parametrize(
    "node,pod,waypoint,says",
    [
        # another workload's certificate asks for the waypoint's configuration
        ("n1", "web-1", "shop/wp", "identity ns/shop/sa/web is not waypoint shop/wp's"),
        # the waypoint wp2's own certificate, but not from one of its pods' addresses
        ("n1", "wp2-1", "shop/wp2", "127.0.0.1 is not the address of a pod of waypoint shop/wp2"),
        # a waypoint's certificate for another waypoint
        ("n1", "wp-1", "shop/wp2", "identity ns/shop/sa/wp is not waypoint shop/wp2's"),
        # a node that runs no pod of it
        ("n2", None, "shop/wp", "node n2 runs no pod of waypoint shop/wp"),
    ],
)
def test_nobody_else_may(env, node, pod, waypoint, says):
    loop, srv = env
    got = _ads(loop, srv, _creds(loop, srv, node, pod), waypoint)
    assert isinstance(got, grpc.RpcError)
    assert got.code() == grpc.StatusCode.PERMISSION_DENIED
    assert says in got.details()


def test_a_waypoints_certificate_from_a_revoked_node_is_refused(env):
    loop, srv = env
    creds = _creds(loop, srv, "n1", "wp-1")
    srv.cp.revoked.revoke("n1")
    got = _ads(loop, srv, creds, "shop/wp")
    assert isinstance(got, grpc.RpcError) and got.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "runs on node n1, which is revoked" in got.details()


def test_peer_addresses_as_grpc_writes_them():
    assert peer_ip("ipv4:10.0.0.1:5000") == "10.0.0.1"
    assert peer_ip("ipv6:[fd00::1]:5000") == "fd00::1"
    assert peer_ip("ipv6:%5Bfd00::1%5D:5000") == "fd00::1"  # as gRPC core writes it
    assert peer_ip("unix:/run/x.sock") == ""


@pytest.mark.parametrize("pod", ["wp-1", None])  # the waypoint's own certificate, its node's
def test_an_open_stream_ends_when_its_node_is_revoked(env, pod):
    """Before: a stream opened before the revocation went on (only a new one was refused)."""
    loop, srv = env
    key, chain = _creds(loop, srv, "n1", pod)

    async def go():
        async with control_channel(
            f"127.0.0.1:{srv.control_port}", srv.cp.ca.bundle_pem(), key, chain
        ) as ch:
            req = discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id="shop/wp"), type_url=CDS)
            held = asyncio.Event()

            async def requests():  # as Envoy's: one request, and the stream kept open
                yield req
                await held.wait()

            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources(
                requests()
            )
            first = await asyncio.wait_for(call.read(), 10)
            srv.cp.revoked.revoke("n1")  # dabba control node revoke n1
            try:
                got = await asyncio.wait_for(call.read(), 10)
            except grpc.RpcError as e:
                return first, e.code(), e.details()
            finally:
                held.set()
                call.cancel()
            return first, got, ""

    first, code, details = loop.run_until_complete(go())
    assert first.type_url == CDS
    assert code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in details, (code, details)
