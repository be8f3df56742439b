"""The supervisor's gRPC server for its Envoy, on a unix socket only root reaches: the secret
stream (SDS, sds.py) and the access log stream (telemetry.py). gRPC over the mesh's own HTTP/2
(agent/http2/wire.py, the HBONE code's, tested against h2 and Envoy), not grpcio: grpcio's
server and its threads were 7.7 MiB of the supervisor's memory and a tenth of a waypoint's CPU
at 1,000 requests/s.

What it serves is exactly what Envoy's gRPC client (``envoy_grpc``) sends: POST of
``application/grpc`` to a method's path, length-prefixed protobuf messages without
compression, both ways, until either side ends; the answer ends with ``grpc-status``. A method
is a coroutine taking the requests as an async iterator and returning one response, or an async
generator yielding responses. An unknown method, a compressed or oversized message, or a
message that does not parse ends its stream with a gRPC error, never the connection or the
supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .. import log
from ..http2 import wire
from ..http2.grpc import MessageError, Messages, StatusCode, frame, status_message

_log = log.get("waypoint")

MAX_MESSAGE = 4 * 1024 * 1024  # gRPC's default limit of a received message
WINDOW = 1 << 20
# what a received message that cannot be taken ends its call with
_REFUSED = {"compressed": StatusCode.UNIMPLEMENTED, "oversized": StatusCode.RESOURCE_EXHAUSTED,
            "unparsable": StatusCode.INVALID_ARGUMENT}  # fmt: skip


class RpcError(Exception):
    def __init__(self, code: StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Method:
    request: type  # the request's protobuf class
    handler: Callable  # (requests: AsyncIterator) -> response, or an async generator of them


class Server:
    def __init__(self, methods: dict[str, Method]):
        self.methods = methods
        self.server: asyncio.AbstractServer | None = None
        self.conns: set[_Conn] = set()

    async def start(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_unix_server(lambda: _Conn(self), path)
        os.chmod(path, 0o600)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for c in list(self.conns):
            c.close()
        if self.server is not None:
            await self.server.wait_closed()


class _Call:
    """One stream: its requests as they arrive, its handler's task, what waits to be sent."""

    def __init__(self, conn: _Conn, sid: int, method: Method):
        self.conn, self.sid, self.method = conn, sid, method
        self.messages = Messages(method.request, MAX_MESSAGE)
        self.requests: asyncio.Queue = asyncio.Queue()
        self.pending = bytearray()  # response bytes the peer's window does not take yet
        self.trailers: list | None = None  # sent once pending is out
        self.task: asyncio.Task | None = None

    def feed(self, data) -> None:
        try:
            got = self.messages.feed(data)
        except MessageError as e:
            raise RpcError(_REFUSED[e.kind], str(e)) from None
        for msg in got:
            self.requests.put_nowait(msg)

    async def _iter(self) -> AsyncIterator:
        while True:
            msg = await self.requests.get()
            if msg is None:
                return
            yield msg

    async def run(self) -> None:
        try:
            result = self.method.handler(self._iter())
            if inspect.isasyncgen(result):
                async for msg in result:
                    self.conn.send(self, frame(msg))
            else:
                self.conn.send(self, frame(await result))
            self.conn.finish(self, StatusCode.OK, "")
        except asyncio.CancelledError:
            raise
        except RpcError as e:
            self.conn.finish(self, e.code, e.message)
        except Exception as e:
            _log.error(f"local gRPC {self.method.handler.__name__} failed: {e!r}")
            self.conn.finish(self, StatusCode.INTERNAL, str(e))


class _Conn(asyncio.Protocol):
    def __init__(self, server: Server):
        self.server = server
        self.h2 = wire.Connection(client_side=False, window=WINDOW, max_frame=16384,
                                  max_streams=16)  # fmt: skip
        self.calls: dict[int, _Call] = {}
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport
        self.server.conns.add(self)
        self.h2.initiate_connection()
        self._write()

    def connection_lost(self, exc):
        self.server.conns.discard(self)
        for call in self.calls.values():
            if call.task:
                call.task.cancel()
        self.calls.clear()

    def close(self) -> None:
        if self.transport and not self.transport.is_closing():
            self.h2.close_connection()
            self._write()
            self.transport.close()

    def _write(self) -> None:
        out = self.h2.data_to_send()
        if out and self.transport and not self.transport.is_closing():
            self.transport.writelines(out)

    def data_received(self, data: bytes):
        try:
            events = self.h2.receive_data(data)
        except wire.ProtocolError as e:
            _log.warning(f"local gRPC: HTTP/2 protocol error from Envoy, closing: {e}")
            self._write()
            self.transport.close()
            return
        try:
            for ev in events:
                if isinstance(ev, wire.RequestReceived):
                    self._request(ev.stream_id, dict(ev.headers))
                elif isinstance(ev, wire.DataReceived):
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    call = self.calls.get(ev.stream_id)
                    if call is not None and call.trailers is None:
                        try:
                            call.feed(ev.data)
                        except RpcError as e:
                            if call.task:
                                call.task.cancel()
                            self.finish(call, e.code, e.message)
                elif isinstance(ev, wire.StreamEnded):
                    call = self.calls.get(ev.stream_id)
                    if call is not None:
                        call.requests.put_nowait(None)
                elif isinstance(ev, wire.StreamReset):
                    call = self.calls.pop(ev.stream_id, None)
                    if call is not None and call.task:
                        call.task.cancel()
                elif isinstance(ev, wire.WindowUpdated):
                    for call in list(self.calls.values()):
                        self._pump(call)
                elif isinstance(ev, wire.ConnectionTerminated):
                    self.transport.close()
        except Exception as e:  # whatever a local client sends ends its connection only
            _log.warning(f"local gRPC connection closed after an unexpected sequence: {e!r}")
            self.transport.abort()
            return
        self._write()

    def _request(self, sid: int, h: dict) -> None:
        method = self.server.methods.get(h.get(":path", ""))
        ok = h.get(":method") == "POST" and h.get("content-type", "").startswith("application/grpc")
        if method is None or not ok:
            why = (f"no method {h.get(':path')!r} here" if ok
                   else "not a gRPC request (POST of application/grpc)")  # fmt: skip
            self.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"),
                                       ("grpc-status", str(StatusCode.UNIMPLEMENTED.value)),
                                       ("grpc-message", status_message(why))],
                                 end_stream=True)  # fmt: skip
            return
        call = self.calls[sid] = _Call(self, sid, method)
        self.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        call.task = asyncio.ensure_future(call.run())

    # -- the handlers' side --
    def send(self, call: _Call, framed: bytes) -> None:
        if self.calls.get(call.sid) is not call:
            raise asyncio.CancelledError  # the stream is gone: its handler ends
        call.pending += framed
        self._pump(call)
        self._write()

    def finish(self, call: _Call, code: StatusCode, message: str) -> None:
        if self.calls.get(call.sid) is not call or call.trailers is not None:
            return
        call.trailers = [("grpc-status", str(code.value))]
        if message:
            call.trailers.append(("grpc-message", status_message(message)))
        self._pump(call)
        self._write()

    def _pump(self, call: _Call) -> None:
        """What the peer's windows take of the call's pending bytes, then its trailers."""
        with contextlib.suppress(wire.StreamClosedError):
            while call.pending:
                n = min(len(call.pending), self.h2.local_flow_control_window(call.sid),
                        self.h2.max_outbound_frame_size)  # fmt: skip
                if n <= 0:
                    return
                self.h2.send_data(call.sid, bytes(call.pending[:n]))
                del call.pending[:n]
            if call.trailers is not None:
                self.h2.send_headers(call.sid, call.trailers, end_stream=True)
                self.calls.pop(call.sid, None)
                if self.h2.state(call.sid) != "closed":  # requests still open: no more read
                    self.h2.reset_stream(call.sid, wire.ErrorCodes.NO_ERROR)
