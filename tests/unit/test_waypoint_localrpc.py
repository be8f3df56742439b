"""The waypoint supervisor's own gRPC server (agent/waypoint/localrpc.py) on a real unix socket,
against grpcio's client as an independent gRPC implementation: the secret stream (SDS, both
ways, a renewal pushed on the open stream), the access log stream (client streaming, messages
larger than a frame), and every error a client can cause, each ending its own stream only.
Envoy, the client it serves in production, talks to it in tests/cluster/test_waypoint.py."""

import asyncio
import os
import struct

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from agent.waypoint import localrpc, sds, telemetry


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


class _Served:
    """A Server with the supervisor's two methods (and a failing one) on a socket in tmp."""

    def __init__(self, tmp):
        self.path = os.path.join(str(tmp), "local.sock")
        self.secrets = sds.Secrets()
        self.telemetry = telemetry.Telemetry("default/wp")
        self.cancelled = asyncio.Event()

        async def boom(requests):
            async for _ in requests:
                raise RuntimeError("the handler failed\non two lines")

        async def odd(requests):
            async for _ in requests:
                raise ValueError('100% ünïcode, "quoted"')

        async def slow(requests):
            try:
                async for _ in requests:
                    pass
                return als_pb2.StreamAccessLogsResponse()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise

        self.server = localrpc.Server({
            sds.PATH: localrpc.Method(discovery_pb2.DiscoveryRequest, self.secrets.StreamSecrets),
            telemetry.PATH: localrpc.Method(als_pb2.StreamAccessLogsMessage,
                                            self.telemetry.StreamAccessLogs),
            "/test.Boom/Call": localrpc.Method(als_pb2.StreamAccessLogsMessage, boom),
            "/test.Slow/Call": localrpc.Method(als_pb2.StreamAccessLogsMessage, slow),
            "/test.Odd/Call": localrpc.Method(als_pb2.StreamAccessLogsMessage, odd),
        })  # fmt: skip

    async def __aenter__(self):
        await self.server.start(self.path)
        self.channel = grpc.aio.insecure_channel(f"unix:{self.path}")
        return self

    async def __aexit__(self, *exc):
        await self.channel.close()
        await self.server.stop()


def _entry(path: str) -> al.HTTPAccessLogEntry:
    e = al.HTTPAccessLogEntry()
    e.common_properties.upstream_cluster = "out|default/api|8080|v1"
    e.request.request_method = 1
    e.request.path = path
    e.response.response_code.value = 200
    return e


def test_the_socket_is_for_root_only(tmp_path):
    async def go():
        async with _Served(tmp_path) as s:
            assert os.stat(s.path).st_mode & 0o777 == 0o600

    _run(go())


def test_secrets_are_served_and_a_renewal_is_pushed_on_the_open_stream(tmp_path):
    async def go():
        async with _Served(tmp_path) as s:
            await s.secrets.set(b"KEY-1", b"CHAIN-1", b"BUNDLE-1")
            reqs: asyncio.Queue = asyncio.Queue()

            async def requests():
                while (r := await reqs.get()) is not None:
                    yield r

            call = sds_pb2_grpc.SecretDiscoveryServiceStub(s.channel).StreamSecrets(requests())
            await reqs.put(discovery_pb2.DiscoveryRequest(resource_names=["default", "ROOTCA"]))
            first = await call.read()
            await s.secrets.set(b"KEY-2", b"CHAIN-2", b"BUNDLE-2")
            second = await call.read()
            await reqs.put(None)
            call.cancel()
            out = []
            for res in (first, second):
                got = {}
                for a in res.resources:
                    sec = secret_pb2.Secret()
                    assert a.Unpack(sec)
                    got[sec.name] = (sec.tls_certificate.private_key.inline_bytes,
                                     sec.tls_certificate.certificate_chain.inline_bytes,
                                     sec.validation_context.trusted_ca.inline_bytes)  # fmt: skip
                out.append(got)
            assert out == [
                {"default": (b"KEY-1", b"CHAIN-1", b""), "ROOTCA": (b"", b"", b"BUNDLE-1")},
                {"default": (b"KEY-2", b"CHAIN-2", b""), "ROOTCA": (b"", b"", b"BUNDLE-2")},
            ]
            assert first.version_info != second.version_info

    _run(go())


def test_access_logs_are_counted_exactly_even_when_larger_than_a_frame(tmp_path):
    async def go():
        async with _Served(tmp_path) as s:
            msgs = []
            for paths in (["/a"], ["/b", "/" + "x" * 100_000], ["/c", "/d"]):
                m = als_pb2.StreamAccessLogsMessage()
                m.http_logs.log_entry.extend(_entry(p) for p in paths)
                msgs.append(m)

            async def requests():
                for m in msgs:
                    yield m

            stub = als_pb2_grpc.AccessLogServiceStub(s.channel)
            res = await stub.StreamAccessLogs(requests())
            assert isinstance(res, als_pb2.StreamAccessLogsResponse)
            assert s.telemetry.received == 5
            assert [r["path"] for r in s.telemetry.since(0)] == [
                "/a", "/b", "/" + "x" * 100_000, "/c", "/d"]  # fmt: skip
            line = next(ln for ln in s.telemetry.registry.text().splitlines()
                        if ln.startswith("istio_requests_total{"))  # fmt: skip
            assert line.endswith(" 5.0"), line

    _run(go())


def _raw_call(channel, path: str, payloads, **kw):
    """A client-streaming call of raw bytes (what grpcio sends as they are)."""
    mc = channel.stream_unary(path, request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)  # fmt: skip

    async def requests():
        for p in payloads:
            yield p

    return mc(requests(), **kw)


@pytest.mark.parametrize(
    ("path", "payloads", "kw", "code", "message"),
    [
        ("/envoy.Nope/Call", [b""], {}, grpc.StatusCode.UNIMPLEMENTED, "no method"),
        (telemetry.PATH, [b"\xff\xff\xff"], {}, grpc.StatusCode.INVALID_ARGUMENT,
         "does not parse"),
        (telemetry.PATH, [b"\x0a" + b"\x00" * (5 << 20)], {},
         grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 4194304"),
        (telemetry.PATH, [als_pb2.StreamAccessLogsMessage().SerializeToString() + b"\x00" * 100],
         {"compression": grpc.Compression.Gzip}, grpc.StatusCode.UNIMPLEMENTED, "compressed"),
        ("/test.Boom/Call", [b""], {}, grpc.StatusCode.INTERNAL, "the handler failed on two"),
        ("/test.Odd/Call", [b""], {}, grpc.StatusCode.INTERNAL, "100% ünïcode, \"quoted\""),
    ],
)  # fmt: skip
def test_a_bad_call_ends_with_its_grpc_error_and_the_next_call_is_served(
    tmp_path, path, payloads, kw, code, message
):
    async def go():
        async with _Served(tmp_path) as s:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _raw_call(s.channel, path, payloads, **kw)
            assert e.value.code() == code
            assert message in e.value.details()
            m = als_pb2.StreamAccessLogsMessage()
            m.http_logs.log_entry.append(_entry("/after"))
            assert await _raw_call(s.channel, telemetry.PATH, [m.SerializeToString()]) == b""
            assert [r["path"] for r in s.telemetry.since(0)] == ["/after"]

    _run(go())


def test_a_client_that_cancels_ends_its_handler(tmp_path):
    async def go():
        async with _Served(tmp_path) as s:
            gate: asyncio.Queue = asyncio.Queue()

            async def requests():
                yield b""
                await gate.get()  # never: the call is cancelled while open

            mc = s.channel.stream_unary("/test.Slow/Call", request_serializer=lambda b: b,
                                        response_deserializer=lambda b: b)  # fmt: skip
            call = mc(requests())
            await asyncio.sleep(0.3)
            call.cancel()
            await asyncio.wait_for(s.cancelled.wait(), 5)
            assert not s.server.conns or all(not c.calls for c in s.server.conns)

    _run(go())


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x09" * 64],
)
def test_a_peer_that_does_not_speak_http2_is_closed_and_the_server_goes_on(tmp_path, garbage):
    async def go():
        async with _Served(tmp_path) as s:
            r, w = await asyncio.open_unix_connection(s.path)
            w.write(garbage)
            await w.drain()
            rest = await asyncio.wait_for(r.read(), 5)  # until the server closes it
            # its last frame a GOAWAY with PROTOCOL_ERROR (RFC 9113 §5.4.1), then the end
            assert rest[-17:] == bytes.fromhex("000008070000000000") + struct.pack(">LL", 0, 1)
            w.close()
            m = als_pb2.StreamAccessLogsMessage()
            m.http_logs.log_entry.append(_entry("/after"))
            assert await _raw_call(s.channel, telemetry.PATH, [m.SerializeToString()]) == b""

    _run(go())


def test_a_status_message_is_percent_encoded_as_grpc_says():
    """Outside printable ASCII and '%' itself (gRPC over HTTP/2: grpc-message); grpcio's client
    decodes it back (the "Odd" call above)."""
    from agent.http2.grpc import status_message

    assert status_message('100% ünïcode\n"x"') == '100%25 %C3%BCn%C3%AFcode "x"'
    assert len(status_message("é" * 600)) == 512 * 6  # 512 characters of the text, encoded
