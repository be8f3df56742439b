"""The agent's gRPC client (agent/node/rpc.py) when the control plane fails or misbehaves: real
TLS on loopback, a real grpcio server that is slow or goes away, and a hostile HTTP/2 server
(the mesh's own HTTP/2 code as the server) that answers what no gRPC server should. Each failure
is an RpcError with the code the agent's retry logic reads (UNAVAILABLE: reconnect), never a
hang or another exception. Its calls against the real control plane: test_control_grpc.py."""

import asyncio
import datetime
import ssl
import struct

import grpc
import pytest

from agent.control import ca as camod
from agent.control.proto import control_pb2 as pb
from agent.http2 import wire
from agent.node import rpc
from agent.node.control_client import describe
from tests.conftest import control_server

REQ = pb.SignWorkloadRequest(namespace="shop", name="web-1", csr_pem=b"csr")


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.fixture
def tls(tmp_path):
    """A CA and a serving certificate for 127.0.0.1: (CA bundle PEM, cert file, key file)."""
    ca = camod.CA.load_or_create(str(tmp_path / "ca"), "cluster.local")
    issued, key = ca.issue_server("spiffe://cluster.local/control", ["127.0.0.1"],
                                  datetime.timedelta(hours=1))  # fmt: skip
    (tmp_path / "srv.pem").write_bytes(issued.chain_pem)
    (tmp_path / "srv.key").write_bytes(key)
    return ca.bundle_pem(), str(tmp_path / "srv.pem"), str(tmp_path / "srv.key")


def _server_ctx(tls, alpn=("h2",)) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls[1], tls[2])
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


class Hostile(asyncio.Protocol):
    """An HTTP/2 server that answers every request with what `answer` writes."""

    def __init__(self, answer):
        self.h2 = wire.Connection(client_side=False, window=1 << 20, max_frame=16384,
                                  max_streams=10)  # fmt: skip
        self.answer = answer

    def connection_made(self, transport):
        self.t = transport
        self.h2.initiate_connection()
        self.t.writelines(self.h2.data_to_send())

    def data_received(self, data):
        for ev in self.h2.receive_data(data):
            if isinstance(ev, wire.RequestReceived):
                self.answer(self, ev.stream_id)
        if not self.t.is_closing():
            self.t.writelines(self.h2.data_to_send())


def _ok_headers(h: Hostile, sid: int) -> None:
    h.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])


def _msg(payload: bytes, flag: int = 0) -> bytes:
    return struct.pack(">BL", flag, len(payload)) + payload


def _oversized(h, sid):
    _ok_headers(h, sid)
    h.h2.send_data(sid, struct.pack(">BL", 0, 17 << 20))


def _not_protobuf(h, sid):
    _ok_headers(h, sid)
    h.h2.send_data(sid, _msg(b"\xff" * 9))
    h.h2.send_headers(sid, [("grpc-status", "0")], end_stream=True)


def _compressed(h, sid):
    _ok_headers(h, sid)
    h.h2.send_data(sid, _msg(b"x", flag=1))


def _no_status(h, sid):
    _ok_headers(h, sid)
    h.h2.send_data(sid, b"", end_stream=True)


def _http_503(h, sid):
    h.h2.send_headers(sid, [(":status", "503")], end_stream=True)


def _status_in_trailers(h, sid):
    _ok_headers(h, sid)
    h.h2.send_headers(sid, [("grpc-status", "7"), ("grpc-message", "not%20you")], end_stream=True)


def _reset(h, sid):
    h.h2.reset_stream(sid, wire.ErrorCodes.REFUSED_STREAM)


def _goaway(h, sid):
    h.h2.highest_peer_id = 0  # GOAWAY naming no stream as processed: the call was not
    h.h2.close_connection()
    h.t.writelines(h.h2.data_to_send())


def _lost(h, sid):
    h.t.close()


ANSWERS = {
    "oversized": (_oversized, rpc.StatusCode.RESOURCE_EXHAUSTED, "at most 16777216"),
    "not protobuf": (_not_protobuf, rpc.StatusCode.INTERNAL, "does not parse"),
    "compressed": (_compressed, rpc.StatusCode.INTERNAL, "compressed"),
    "no status": (_no_status, rpc.StatusCode.INTERNAL, "without a status"),
    "http 503": (_http_503, rpc.StatusCode.UNAVAILABLE, "HTTP status 503"),
    "status in trailers": (_status_in_trailers, rpc.StatusCode.PERMISSION_DENIED, "not you"),
    "reset": (_reset, rpc.StatusCode.UNAVAILABLE, "stream reset"),
    "goaway": (_goaway, rpc.StatusCode.UNAVAILABLE, "closed the connection"),
    "lost": (_lost, rpc.StatusCode.UNAVAILABLE, "connection to the control plane lost"),
    "silence": (lambda h, sid: None, rpc.StatusCode.DEADLINE_EXCEEDED, "no answer within 0.5 s"),
}


@pytest.mark.parametrize("case", list(ANSWERS))
def test_a_hostile_or_broken_answer_is_an_rpc_error_with_its_code(tls, case):
    answer, code, why = ANSWERS[case]

    async def go():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: Hostile(answer), "127.0.0.1", 0,
                                       ssl=_server_ctx(tls))  # fmt: skip
        port = srv.sockets[0].getsockname()[1]
        try:
            async with rpc.Channel(f"127.0.0.1:{port}", tls[0]) as ch:
                with pytest.raises(rpc.RpcError) as e:
                    await rpc.ControlStub(ch).SignWorkload(REQ, timeout=0.5)
                assert e.value.code() == code
                assert why in e.value.details()
        finally:
            srv.close()

    _run(go())


def test_nothing_listening_is_unavailable_and_the_agent_says_unreachable(tls):
    async def go():
        async with rpc.Channel("127.0.0.1:1", tls[0]) as ch:
            with pytest.raises(rpc.RpcError) as e:
                await rpc.ControlStub(ch).SignWorkload(REQ, timeout=5)
        return e.value

    err = _run(go())
    assert err.code() == rpc.StatusCode.UNAVAILABLE and "failed to connect" in err.details()
    assert "the control plane at 127.0.0.1:1 is unreachable" in str(describe(err, "127.0.0.1:1"))


@pytest.mark.parametrize(
    ("alpn", "roots", "why"),
    [(("http/1.1",), None, "does not speak HTTP/2"),
     (("h2",), "other", "TLS handshake failed")],
)  # fmt: skip
def test_a_server_that_is_not_the_control_plane_is_unavailable(tls, tmp_path, alpn, roots, why):
    """No HTTP/2 after the handshake, or a certificate from another CA."""
    other = camod.CA.load_or_create(str(tmp_path / "other"), "cluster.local").bundle_pem()

    async def go():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0,
                                       ssl=_server_ctx(tls, alpn))  # fmt: skip
        port = srv.sockets[0].getsockname()[1]
        try:
            async with rpc.Channel(f"127.0.0.1:{port}", other if roots else tls[0]) as ch:
                with pytest.raises(rpc.RpcError) as e:
                    await rpc.ControlStub(ch).SignWorkload(REQ, timeout=5)
                return e.value
        finally:
            srv.close()

    err = _run(go())
    assert err.code() == rpc.StatusCode.UNAVAILABLE and why in err.details(), err


REG = """\
apiVersion: dabbawala.io/v1
kind: Workload
metadata: {name: web-1, namespace: shop}
spec: {serviceAccount: web, node: n1, ip: 10.20.1.11}
"""


def test_the_watch_stream_ends_unavailable_when_the_control_plane_goes_away(tmp_path):
    """The agent reconnects on UNAVAILABLE (sync.py); a stream that hung instead would leave
    the node on a snapshot it thinks is live."""
    from agent.node.control_client import join

    with control_server(tmp_path, REG) as (loop, srv):
        key, cert = loop.run_until_complete(join(f"127.0.0.1:{srv.join_port}",
                                                 srv.cp.ca.bundle_pem(), "n1",
                                                 srv.cp.tokens.create("n1", 60), "10.10.0.11"))  # fmt: skip
        (tmp_path / "k.pem").write_bytes(key)
        (tmp_path / "c.pem").write_bytes(cert.cert_chain_pem)

        async def go():
            ch = rpc.Channel(f"127.0.0.1:{srv.control_port}", srv.cp.ca.bundle_pem(),
                             str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))  # fmt: skip
            async with ch:
                stream = rpc.ControlStub(ch).Watch(pb.WatchRequest(have_version=0))
                first = await anext(stream)
                await srv.stop()
                with pytest.raises(rpc.RpcError) as e:
                    await asyncio.wait_for(anext(stream), 10)
            return first, e.value

        first, err = loop.run_until_complete(go())
        assert [w.name for w in first.workloads] == ["web-1"]
        assert err.code() == rpc.StatusCode.UNAVAILABLE, (
            err
        )  # grpcio's server: "Cancelling all calls"


def test_a_slow_grpcio_server_meets_the_deadline_and_the_channel_serves_the_next_call(tls):
    """grpcio's server, the control plane's: a deadline sent as grpc-timeout is kept on both
    sides; the connection stays usable."""

    async def go():
        calls = []

        async def sign(req, ctx):
            calls.append(req.name)
            if req.name == "slow":
                await asyncio.sleep(5)
            return pb.WorkloadCertificate(spiffe_id="spiffe://cluster.local/ns/shop/sa/" + req.name)

        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "dabba.control.v1.Control", {"SignWorkload": grpc.unary_unary_rpc_method_handler(
                sign, request_deserializer=pb.SignWorkloadRequest.FromString,
                response_serializer=pb.WorkloadCertificate.SerializeToString)})])  # fmt: skip
        with open(tls[1], "rb") as c, open(tls[2], "rb") as k:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        try:
            async with rpc.Channel(f"127.0.0.1:{port}", tls[0]) as ch:
                stub = rpc.ControlStub(ch)
                t0 = asyncio.get_running_loop().time()
                with pytest.raises(rpc.RpcError) as e:
                    await stub.SignWorkload(pb.SignWorkloadRequest(name="slow"), timeout=0.5)
                took = asyncio.get_running_loop().time() - t0
                fast = await stub.SignWorkload(pb.SignWorkloadRequest(name="fast"), timeout=5)
                again = await stub.SignWorkload(pb.SignWorkloadRequest(name="again"), timeout=5)
        finally:
            await server.stop(0)
        return e.value, took, fast, again, calls

    err, took, fast, again, calls = _run(go())
    assert err.code() == rpc.StatusCode.DEADLINE_EXCEEDED and took < 2
    assert (fast.spiffe_id, again.spiffe_id) == ("spiffe://cluster.local/ns/shop/sa/fast",
                                                 "spiffe://cluster.local/ns/shop/sa/again")  # fmt: skip
    assert calls == ["slow", "fast", "again"]
