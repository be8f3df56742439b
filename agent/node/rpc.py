"""The agent's gRPC client to the control plane: unary calls (Join, SignWorkload, RenewNode) and
the Watch stream, over TLS 1.2+ (the node's certificate for mutual TLS) and the mesh's own
HTTP/2 (agent/http2/wire.py), not grpcio: grpcio's import and its threads were 7.7 MiB of
every node's agent, for four methods.

It speaks what gRPC's HTTP/2 protocol says a client sends (POST of ``application/grpc``, ``te:
trailers``, ``grpc-timeout``, length-prefixed messages without compression) and reads the status
from the trailers, or from a trailers-only answer. Its errors are :class:`RpcError` with gRPC's
codes: what cannot connect, a failed handshake, a lost connection or a GOAWAY is UNAVAILABLE, as
grpcio says it; a call past its deadline is DEADLINE_EXCEEDED. The control plane's server is
grpcio's (tests/unit/test_node_rpc.py calls it through this client).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import urllib.parse

from ..control import wire as proto  # control.proto's messages
from ..http2 import wire
from ..http2.grpc import MessageError, Messages, StatusCode, frame

MAX_MESSAGE = 16 << 20  # a snapshot of a large cluster: as grpcio's channel allowed
WINDOW = 1 << 22
JOIN = "/dabba.control.v1.Join/Join"
SIGN = "/dabba.control.v1.Control/SignWorkload"
RENEW = "/dabba.control.v1.Control/RenewNode"
WATCH = "/dabba.control.v1.Control/Watch"


# gRPC's mapping of an HTTP status that is not 200 (doc/http-grpc-status-mapping.md)
_HTTP = {400: StatusCode.INTERNAL, 401: StatusCode.UNAUTHENTICATED,
         403: StatusCode.PERMISSION_DENIED, 404: StatusCode.UNIMPLEMENTED,
         429: StatusCode.UNAVAILABLE, 502: StatusCode.UNAVAILABLE,
         503: StatusCode.UNAVAILABLE, 504: StatusCode.UNAVAILABLE}  # fmt: skip


class RpcError(Exception):
    def __init__(self, code: StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _status(headers: list) -> tuple[StatusCode, str] | None:
    h = dict(headers)
    if "grpc-status" not in h:
        return None
    try:
        code = StatusCode(int(h["grpc-status"]))
    except ValueError:
        code = StatusCode.UNKNOWN
    return code, urllib.parse.unquote(h.get("grpc-message", ""))


class _Call:
    """One stream's answer: messages as they come, then its end (None) or an RpcError."""

    def __init__(self, response: type):
        self.messages = Messages(response, MAX_MESSAGE)
        self.q: asyncio.Queue = asyncio.Queue()
        self.done = False

    def feed(self, data) -> None:
        try:
            got = self.messages.feed(data)
        except MessageError as e:
            code = StatusCode.RESOURCE_EXHAUSTED if e.kind == "oversized" else StatusCode.INTERNAL
            raise RpcError(code, f"the answer: {e}") from None
        for msg in got:
            self.q.put_nowait(msg)

    def finish(self, err: RpcError | None) -> None:
        if not self.done:
            self.done = True
            self.q.put_nowait(err)


class _Conn(asyncio.Protocol):
    def __init__(self):
        self.h2 = wire.Connection(client_side=True, window=WINDOW, max_frame=16384,
                                  max_streams=100)  # fmt: skip
        self.calls: dict[int, _Call] = {}
        self.transport: asyncio.Transport | None = None
        self.lost: RpcError | None = None

    def connection_made(self, transport):
        self.transport = transport
        self.h2.initiate_connection()
        self.write()

    def write(self) -> None:
        out = self.h2.data_to_send()
        if out and self.transport and not self.transport.is_closing():
            self.transport.writelines(out)

    def connection_lost(self, exc):
        self.lost = RpcError(StatusCode.UNAVAILABLE,
                             f"connection to the control plane lost: {exc or 'closed'}")  # fmt: skip
        for call in self.calls.values():
            call.finish(self.lost)
        self.calls.clear()

    def data_received(self, data: bytes):
        try:
            events = self.h2.receive_data(data)
        except wire.ProtocolError as e:
            self.write()
            self.transport.close()
            self.lost = RpcError(StatusCode.UNAVAILABLE, f"HTTP/2 protocol error: {e}")
            return
        for ev in events:
            call = self.calls.get(getattr(ev, "stream_id", -1))
            if isinstance(ev, wire.ResponseReceived) and call is not None:
                h = dict(ev.headers)
                status = h.get(":status", "")
                if status != "200":
                    code = _HTTP.get(int(status) if status.isdigit() else 0, StatusCode.UNKNOWN)
                    self._end(ev.stream_id, RpcError(code, f"HTTP status {status}"))
                elif (st := _status(ev.headers)) is not None:  # trailers-only
                    self._end(ev.stream_id, None if st[0] is StatusCode.OK else RpcError(*st))
            elif isinstance(ev, wire.DataReceived):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if call is not None:
                    try:
                        call.feed(ev.data)
                    except RpcError as e:
                        self._end(ev.stream_id, e)
            elif isinstance(ev, wire.TrailersReceived) and call is not None:
                st = _status(ev.headers) or (StatusCode.INTERNAL, "trailers without grpc-status")
                self._end(ev.stream_id, None if st[0] is StatusCode.OK else RpcError(*st))
            elif isinstance(ev, wire.StreamEnded) and call is not None:
                self._end(ev.stream_id, RpcError(StatusCode.INTERNAL, "the answer ended without "
                                                 "a status"))  # fmt: skip
            elif isinstance(ev, wire.StreamReset) and call is not None:
                code = {wire.ErrorCodes.REFUSED_STREAM: StatusCode.UNAVAILABLE,
                        wire.ErrorCodes.CANCEL: StatusCode.CANCELLED}.get(
                    ev.error_code, StatusCode.INTERNAL)  # fmt: skip
                self._end(ev.stream_id, RpcError(code, f"stream reset ({ev.error_code})"), False)
            elif isinstance(ev, wire.ConnectionTerminated):
                gone = RpcError(StatusCode.UNAVAILABLE, "the control plane closed the connection")
                for sid in [s for s in self.calls if s > ev.last_stream_id]:
                    self._end(sid, gone, False)
                self.lost = self.lost or gone
        self.write()

    def _end(self, sid: int, err: RpcError | None, reset: bool = True) -> None:
        call = self.calls.pop(sid, None)
        if call is None:
            return
        call.finish(err)
        if reset and self.h2.state(sid) != "closed":
            with contextlib.suppress(wire.StreamClosedError):
                self.h2.reset_stream(sid, wire.ErrorCodes.CANCEL)

    def start(self, path: str, authority: str, request, response: type, timeout) -> int:
        if self.lost is not None:
            raise self.lost
        sid = self.h2.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "https"), (":path", path),
                   (":authority", authority), ("content-type", "application/grpc"),
                   ("te", "trailers"), ("user-agent", "dabba-agent")]  # fmt: skip
        if timeout is not None:
            headers.append(("grpc-timeout", f"{max(1, int(timeout * 1000))}m"))
        try:
            self.h2.send_headers(sid, headers)
        except wire.StreamClosedError as e:
            raise RpcError(StatusCode.UNAVAILABLE, str(e)) from None
        msg = frame(request)
        if len(msg) > min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size):
            raise RpcError(StatusCode.RESOURCE_EXHAUSTED, f"a request of {len(msg)} bytes")
        self.h2.send_data(sid, msg, end_stream=True)
        self.calls[sid] = _Call(response)
        self.write()
        return sid

    def cancel(self, sid: int) -> None:
        if sid in self.calls:
            self._end(sid, RpcError(StatusCode.CANCELLED, "cancelled"))
            self.write()


class Channel:
    """One HTTP/2 connection to the control plane, opened at the first call; ``async with``
    closes it. ca_pem: the roots the server's certificate must chain to (its name checked
    against the address's host); chain_file and key_file: the node's, for mutual TLS, read
    where the agent keeps them (Python's ssl takes no key from memory; nothing is copied)."""

    def __init__(self, addr: str, ca_pem: bytes, chain_file: str | None = None,
                 key_file: str | None = None):  # fmt: skip
        host, _, port = addr.rpartition(":")
        self.addr, self.host, self.port = addr, host.strip("[]"), int(port)
        self.ca_pem, self.chain_file, self.key_file = ca_pem, chain_file, key_file
        self.ctx: ssl.SSLContext | None = None
        self.conn: _Conn | None = None
        self._opening: asyncio.Lock | None = None

    def _context(self) -> ssl.SSLContext:
        if self.ctx is None:
            try:
                ctx = ssl.create_default_context(cadata=self.ca_pem.decode())
                if self.chain_file and self.key_file:
                    ctx.load_cert_chain(self.chain_file, self.key_file)
            except (ssl.SSLError, ValueError, OSError) as e:  # a renewal between the two files
                raise RpcError(StatusCode.UNAVAILABLE,
                               f"the node's TLS material is not usable: {e}") from None  # fmt: skip
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_alpn_protocols(["h2"])
            self.ctx = ctx
        return self.ctx

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self.conn is not None and self.conn.transport is not None:
            with contextlib.suppress(Exception):
                self.conn.h2.close_connection()
                self.conn.write()
            self.conn.transport.close()
        self.conn = None

    async def _connection(self, timeout: float | None) -> _Conn:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self.conn is not None and self.conn.lost is None:
                return self.conn
            loop = asyncio.get_running_loop()
            try:
                _, conn = await asyncio.wait_for(
                    loop.create_connection(_Conn, self.host, self.port, ssl=self._context(),
                                           server_hostname=self.host),
                    timeout or 20,
                )  # fmt: skip
            except TimeoutError:
                raise RpcError(StatusCode.UNAVAILABLE, f"no connection to {self.addr} "
                               f"within {timeout or 20:.0f} s") from None  # fmt: skip
            except ssl.SSLError as e:
                raise RpcError(StatusCode.UNAVAILABLE, f"TLS handshake failed: {e}") from None
            except OSError as e:
                raise RpcError(StatusCode.UNAVAILABLE, f"failed to connect: {e}") from None
            ssl_obj = conn.transport.get_extra_info("ssl_object")
            if ssl_obj is not None and ssl_obj.selected_alpn_protocol() != "h2":
                conn.transport.close()
                raise RpcError(StatusCode.UNAVAILABLE, f"{self.addr} does not speak HTTP/2")
            self.conn = conn
            return conn

    async def unary(self, path: str, request, response: type, timeout: float | None = None):
        async with _deadline(timeout):
            conn = await self._connection(timeout)
            sid = conn.start(path, self.addr, request, response, timeout)
            call = conn.calls[sid]
            try:
                got = await call.q.get()
                if isinstance(got, RpcError):
                    raise got
                if got is None:
                    raise RpcError(StatusCode.INTERNAL, "no answer message")
                end = await call.q.get()  # the status
                if isinstance(end, RpcError):
                    raise end
                return got
            finally:
                conn.cancel(sid)

    async def stream(self, path: str, request, response: type):
        """The answers of a server-streaming call, until it ends (an error raises)."""
        conn = await self._connection(None)
        sid = conn.start(path, self.addr, request, response, None)
        call = conn.calls[sid]
        try:
            while True:
                got = await call.q.get()
                if got is None:
                    return
                if isinstance(got, RpcError):
                    raise got
                yield got
        finally:
            conn.cancel(sid)


@contextlib.asynccontextmanager
async def _deadline(timeout: float | None):
    if timeout is None:
        yield
        return
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        raise RpcError(StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:g} s") from None


class JoinStub:
    def __init__(self, ch: Channel):
        self.ch = ch

    async def Join(
        self, req: proto.JoinRequest, timeout: float | None = None
    ) -> proto.NodeCertificate:
        return await self.ch.unary(JOIN, req, proto.NodeCertificate, timeout)


class ControlStub:
    def __init__(self, ch: Channel):
        self.ch = ch

    async def SignWorkload(self, req, timeout: float | None = None) -> proto.WorkloadCertificate:
        return await self.ch.unary(SIGN, req, proto.WorkloadCertificate, timeout)

    async def RenewNode(self, req, timeout: float | None = None) -> proto.NodeCertificate:
        return await self.ch.unary(RENEW, req, proto.NodeCertificate, timeout)

    def Watch(self, req: proto.WatchRequest):
        return self.ch.stream(WATCH, req, proto.Snapshot)
