"""HBONE's HTTP/2 side shared by both ends: limits, the TCP side of a stream, a stream, and the
connection that relays streams with flow control carrying TCP backpressure both ways."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import struct
import time
import urllib.parse
from dataclasses import dataclass

from ... import log
from ...http2 import wire
from ...node.addresses import split_hostport
from ..tls import peer_identity

_log = log.get("hbone")


MAX_STREAMS = 100_000  # per connection; descriptors are the real bound
WINDOW = 16 * 1024 * 1024  # per stream and per connection: room for throughput on fast links
MAX_FRAME = 256 * 1024
# A peer that asks for answers (PING, SETTINGS) and does not read them would grow our buffer
# without bound: while our unsent bytes exceed CONTROL_HIGH, at most MAX_QUEUED_CONTROL such
# answers are queued, then the connection is closed (ENHANCE_YOUR_CALM), as Envoy's
# max_outbound_control_frames does; and never more than MAX_UNSENT bytes at all (data is
# bounded by the windows, 16 MiB).
CONTROL_HIGH = 1 << 20
MAX_QUEUED_CONTROL = 1000
MAX_UNSENT = 64 << 20
# CONNECT requests whose upstream connect is still running, per connection: more are refused
# (REFUSED_STREAM, which a client may retry: RFC 9113 §8.7) before any connect starts
MAX_PENDING_OPENS = 1024
# streams a peer resets, per connection, in RESET_WINDOW seconds: more closes the connection
# ("rapid reset", CVE-2023-44487)
MAX_RESETS, RESET_WINDOW = 2000, 10.0
TCP_HIGH_WATER = 4 * 1024 * 1024
HBONE_HIGH_WATER = 1024 * 1024  # unsent bytes on an HBONE connection before its DATA waits


class HboneError(Exception):
    """A flow could not be opened; the message says why (identity, refusal, connect)."""

    refused_stream = False  # the peer refused the stream before acting on it: safe to retry


POOL_MAX_AGE = 3600.0  # a pooled HBONE connection takes no new flow after this (s): well below
# a workload certificate's life (24 h; renewed at half), and a renewal replaces it at once


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def rst(transport: asyncio.BaseTransport) -> None:
    """Close a TCP transport with a reset (SO_LINGER 0), so its peer sees a reset, not an EOF."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


# ---- the TCP side of a flow ---------------------------------------------------------------------


class TcpSide(asyncio.Protocol):
    """A plain TCP connection coupled to one HBONE stream."""

    open = 0  # live TCP sides in this process: what a draining tunnel waits for

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.stream: Stream | None = None
        self.pending: list[bytes] = []  # data before the stream is attached
        self.eof = False
        self.on_close = None  # called once the connection is gone
        self.lost = False  # the TCP connection is gone

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=TCP_HIGH_WATER)
        TcpSide.open += 1

    def attach(self, stream: Stream) -> None:
        self.stream = stream
        stream.tcp = self
        if stream.closed:  # reset by the peer before we got here
            if self.transport and not self.lost:
                rst(self.transport)
            return
        for chunk in self.pending:
            stream.send(chunk)
        if self.pending and self.transport and not self.eof:
            self.transport.resume_reading()
        self.pending.clear()
        if self.eof:
            stream.end()
        # what the peer sent before we were attached (a server that speaks first)
        if stream.early:
            for chunk in stream.early:
                self.transport.write(chunk)
            stream.early.clear()
            stream.conn.ack_pending(stream)
        if stream.early_end:
            if self.transport.can_write_eof():
                self.transport.write_eof()
            stream.conn._maybe_done(stream)
        if self.lost and not stream.closed:
            # the TCP side died before the flow was set up: tell the peer, or both ends wait
            _log.info("TCP side gone before its flow was attached; stream reset")
            stream.reset()

    def data_received(self, data: bytes):
        if self.stream is None:
            self.pending.append(data)
            if sum(map(len, self.pending)) > TCP_HIGH_WATER:
                self.transport.pause_reading()  # until the flow is attached
        else:
            self.stream.send(data)

    def eof_received(self):
        # A transport may report EOF again when reading resumes after it (flush pauses and
        # resumes reading while data waits for window): end the stream once only.
        if self.eof:
            return True
        self.eof = True
        if self.stream is not None:
            self.stream.end()
        return True  # keep our sending half open: half-close

    def connection_lost(self, exc):
        TcpSide.open -= 1
        self.lost = True
        if self.on_close is not None:
            self.on_close()
        if self.stream is not None and not self.stream.closed:
            self.stream.reset() if exc else self.stream.end()

    def pause_writing(self):
        if self.stream:
            self.stream.tcp_paused = True

    def resume_writing(self):
        if self.stream:
            self.stream.tcp_paused = False
            self.stream.conn.ack_pending(self.stream)


# ---- HTTP/2 connections ---------------------------------------------------------------------------


@dataclass
class Stream:
    """One flow on an HBONE connection."""

    conn: H2Connection
    stream_id: int
    authority: str
    tcp: TcpSide | None = None
    outbuf: bytearray = None  # waiting for send window
    end_pending: bool = False
    ended: bool = False  # our end of stream was asked for (sent once the queue is out)
    closed: bool = False
    tcp_paused: bool = False
    unacked: int = 0  # received bytes written to TCP but not yet acknowledged
    bytes_in: int = 0
    bytes_out: int = 0
    source: str | None = None  # the client workload's address, from Forwarded: for=
    early: list = None  # data received before a TCP side was attached
    early_end: bool = False  # the peer ended the stream before that

    def __post_init__(self):
        self.outbuf = bytearray()
        self.early = []

    def send(self, data: bytes) -> None:
        if self.outbuf:  # keep order behind what already waits for window
            self.outbuf += data
            self.conn.flush(self)
        else:  # the usual case: straight into frames, no copy into outbuf and back
            self.conn.flush(self, data)

    def end(self) -> None:
        if self.ended:  # a second END_STREAM is a protocol error that would close the flow
            return
        self.ended = True
        self.end_pending = True
        self.conn.flush(self)

    def reset(self) -> None:
        self.conn.reset_stream(self)


class H2Connection(asyncio.Protocol):
    """Shared by client and server: h2 state, streams, flow control."""

    client_side = True

    def __init__(self):
        # RFC 9113 §8.5: a CONNECT request carries :method and :authority only; the server
        # checks what it uses (:method, :authority) itself (_authority_ok). Our own limit on
        # the peer's concurrent streams applies from its first frame.
        self.h2 = wire.Connection(
            client_side=self.client_side,
            window=WINDOW,
            max_frame=MAX_FRAME,
            max_streams=MAX_STREAMS,
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.closed = asyncio.get_event_loop().create_future()
        self.peer_id: str | None = None
        self.last_active = time.monotonic()
        self._queued_control = 0  # answers queued while the peer does not read (CONTROL_HIGH)
        self._resets: list[float] = []  # when the peer reset streams (RESET_WINDOW)

    on_refused = None  # set by a Listener: called with a refusal kind ("flood", ...)

    def _calm_down(self, kind: str, why: str) -> None:
        """Close a connection whose peer abuses it: GOAWAY ENHANCE_YOUR_CALM, counted."""
        _log.warning(f"HBONE connection closed: {why}", fields={"peer": self.peer_id})
        if self.on_refused:
            self.on_refused(kind)
        with contextlib.suppress(Exception):
            self.h2.close_connection(error_code=wire.ErrorCodes.ENHANCE_YOUR_CALM)
            out = self.h2.data_to_send()
            if out and self.transport:
                self.transport.writelines(out)
        if self.transport:
            self.transport.abort()

    def drain(self, deadline: float) -> None:
        """Take no new flow (GOAWAY to the peer), let the open ones finish, and close the
        connection after deadline seconds at most."""
        with contextlib.suppress(Exception):
            self.h2.close_connection()
            self._write()
        retire = getattr(self, "retire", None)  # a client connection: out of its pool
        if retire is not None:
            retire()
        if self.transport is not None:
            tr = self.transport
            asyncio.get_running_loop().call_later(
                deadline, lambda: None if tr.is_closing() else tr.abort()
            )

    def _check_unsent(self, answers: int) -> bool:
        """After queueing answers (PING/SETTINGS acks): True when the peer floods us."""
        unsent = self.transport.get_write_buffer_size() if self.transport else 0
        if unsent <= CONTROL_HIGH:
            self._queued_control = 0
            return False
        self._queued_control += answers
        if self._queued_control > MAX_QUEUED_CONTROL or unsent > MAX_UNSENT:
            self._calm_down("flood", f"the peer does not read its answers ({unsent} bytes unsent)")
            return True
        return False

    # -- transport callbacks --
    write_paused = False  # our TLS transport holds more than HBONE_HIGH_WATER unsent

    def pause_writing(self):
        # DATA waits in its streams (their TCP sides paused) until the transport drains:
        # before, a fast sender pushed a connection's whole window (16 MiB) into the TLS
        # transport, and its buffers stayed that large
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False
        for s in list(self.streams.values()):
            if self.write_paused:  # backed up again: the rest wait for the next turn
                break
            if s.outbuf or s.end_pending:
                self.flush(s)
                if self.streams.get(s.stream_id) is s:  # served: to the back of the line
                    self.streams[s.stream_id] = self.streams.pop(s.stream_id)

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=HBONE_HIGH_WATER)
        self.peer_id = peer_identity(transport.get_extra_info("ssl_object"))
        self.h2.initiate_connection()  # our SETTINGS and the connection's window
        self._write()

    def data_received(self, data: bytes):
        try:
            events = self.h2.receive_data(data)
        except wire.ProtocolError as e:
            _log.warning(
                f"HTTP/2 protocol error from peer, closing: {e}", fields={"peer": self.peer_id}
            )
            self._write()
            self.transport.close()
            return
        self.last_active = time.monotonic()
        answers = 0
        try:
            for ev in events:
                if isinstance(ev, wire.PingReceived | wire.RemoteSettingsChanged):
                    answers += 1  # wire queues the ACK itself
                elif isinstance(ev, wire.StreamReset) and ev.remote_reset and self._reset_storm():
                    return
                self.handle(ev)
        except Exception as e:  # whatever a peer sends, it takes down this connection only
            _log.warning(
                f"HBONE connection closed after an unexpected frame sequence: {e!r}",
                fields={"peer": self.peer_id},
            )
            self.transport.abort()
            return
        self._write()
        if answers:
            self._check_unsent(answers)

    def _reset_storm(self) -> bool:
        now = time.monotonic()
        self._resets.append(now)
        if len(self._resets) > MAX_RESETS:
            self._resets = [t for t in self._resets if now - t < RESET_WINDOW]
            if len(self._resets) > MAX_RESETS:
                self._calm_down(
                    "reset_storm", f"{len(self._resets)} streams reset in {RESET_WINDOW:.0f}s"
                )
                return True
        return False

    def connection_lost(self, exc):
        for s in list(self.streams.values()):
            if s.tcp and s.tcp.transport:
                rst(s.tcp.transport)
            s.closed = True
        self.streams.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def _write(self):
        out = self.h2.data_to_send()
        if out and self.transport and not self.transport.is_closing():
            if len(out) == 1:
                self.transport.write(out[0])
            else:  # a large DATA frame: its first record's worth and a view of the rest
                self.transport.writelines(out)

    # -- events --
    def handle(self, ev):
        if isinstance(ev, wire.DataReceived):
            s = self.streams.get(ev.stream_id)
            if s is None:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                return
            if (
                s.tcp is None
            ):  # not attached yet: keep it (unacknowledged, so bounded by the window)
                s.bytes_in += len(ev.data)
                s.early.append(ev.data)
                s.unacked += ev.flow_controlled_length
                return
            s.bytes_in += len(ev.data)
            s.tcp.transport.write(ev.data)
            s.unacked += ev.flow_controlled_length
            self.ack_pending(s)
        elif isinstance(ev, wire.StreamEnded):
            s = self.streams.get(ev.stream_id)
            if s is not None and s.tcp is None:
                s.early_end = True
                return
            if s and s.tcp and s.tcp.transport and s.tcp.transport.can_write_eof():
                s.tcp.transport.write_eof()
            self._maybe_done(s)
        elif isinstance(ev, wire.StreamReset):
            s = self.streams.get(ev.stream_id)
            if s:
                self.drop(s)
                if s.tcp and s.tcp.transport:
                    rst(s.tcp.transport)
        elif isinstance(ev, wire.WindowUpdated):
            targets = (
                self.streams.values() if ev.stream_id == 0 else [self.streams.get(ev.stream_id)]
            )
            for s in list(targets):
                if s:
                    self.flush(s)

    def drop(self, s: Stream) -> None:
        """s is done: out of the map, closed, and what it held unacknowledged given back to
        the connection's window (its own window ends with it). Before, a flow that ended while
        its TCP side was backed up kept its share of the pooled connection's window for good:
        one bulk flow ended so (up to the whole 16 MiB) stalled every later flow on it."""
        self.streams.pop(s.stream_id, None)
        s.closed = True
        if s.unacked:
            self.h2.acknowledge_received_data(s.unacked, s.stream_id)
            s.unacked = 0
            self._write()

    def ack_pending(self, s: Stream) -> None:
        """Open the window for what TCP took, unless TCP is backed up (that is the backpressure)."""
        if s.unacked and not s.tcp_paused and not s.closed:
            try:
                self.h2.acknowledge_received_data(s.unacked, s.stream_id)
            except wire.StreamClosedError:
                pass
            s.unacked = 0
            self._write()

    def flush(self, s: Stream, data: bytes = b"") -> None:
        """Send what the windows allow: first data (when nothing was queued), then the queue."""
        if s.closed:
            return
        try:
            off, n, view = 0, len(data), None
            while off < n:
                window = self._window(s)
                if window <= 0:
                    s.outbuf += data[off:] if view is None else view[off:]
                    break
                take = min(window, n - off)
                if take == n:
                    chunk = data
                else:  # frames of a view: no copy of what remains
                    view = view or memoryview(data)
                    chunk = view[off : off + take]
                self.h2.send_data(s.stream_id, chunk)
                s.bytes_out += take
                off += take
                self._write()  # the transport may ask us to pause (pause_writing)
            while s.outbuf:
                window = self._window(s)
                if window <= 0:
                    break
                chunk = bytes(s.outbuf[:window])
                del s.outbuf[:window]
                self.h2.send_data(s.stream_id, chunk)
                s.bytes_out += len(chunk)
                self._write()
            if s.tcp and s.tcp.transport and not s.tcp.eof:
                # pause the TCP side while data waits for window (after its EOF there is
                # nothing left to read)
                (s.tcp.transport.pause_reading if s.outbuf else s.tcp.transport.resume_reading)()
            if s.end_pending and not s.outbuf:
                self.h2.end_stream(s.stream_id)
                s.end_pending = False
                self._maybe_done(s)
        except wire.StreamClosedError:
            # the peer closed or reset the stream under us: release its TCP side too
            self.drop(s)
            if s.tcp and s.tcp.transport and not s.tcp.lost:
                s.tcp.transport.close() if s.tcp.eof else rst(s.tcp.transport)
        self._write()

    def _window(self, s: Stream) -> int:
        """How much of s's data may go out now: its flow-control windows and the peer's frame
        size, nothing while our transport is backed up."""
        if self.write_paused:
            return 0
        return min(self.h2.local_flow_control_window(s.stream_id), self.h2.max_outbound_frame_size)

    def reset_stream(self, s: Stream) -> None:
        if not s.closed:
            s.closed = True
            try:
                self.h2.reset_stream(s.stream_id, error_code=wire.ErrorCodes.CONNECT_ERROR)
            except wire.StreamClosedError:
                pass
            self.drop(s)
            self._write()

    def _maybe_done(self, s: Stream | None) -> None:
        if s is None:
            return
        if s.stream_id not in self.h2.streams:
            self.drop(s)
            if s.tcp and s.tcp.transport and s.tcp.eof:
                s.tcp.transport.close()


def _forwarded_for(value) -> str | None:
    """The for= address of a Forwarded header (RFC 7239): a plain IPv4 address, or an IPv6
    one in brackets (for="[fd00::1]"); None for anything else."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    for part in str(value).split(";"):
        k, _, v = part.strip().partition("=")
        if k.lower() == "for":
            v = v.strip('"')
            try:
                if v.startswith("[") and v.endswith("]"):
                    return str(ipaddress.IPv6Address(v[1:-1]))
                return str(ipaddress.IPv4Address(v))
            except ValueError:
                return None
    return None


def forwarded(addr: str) -> str:
    """A Forwarded header's value naming addr (RFC 7239: an IPv6 address quoted, bracketed)."""
    return f'for="[{addr}]"' if ":" in addr else f"for={addr}"


def baggage(namespace: str, name: str, app: str = "", version: str = "") -> str:
    """A W3C baggage header naming a flow's source workload, as Istio's ztunnel tells a
    waypoint (its request metrics' source_workload, source_app, source_version): namespace,
    pod, and the app and version labels it has; values percent-encoded."""
    items = (("k8s.namespace.name", namespace), ("k8s.pod.name", name),
             ("service.name", app), ("service.version", version))  # fmt: skip
    return ",".join(f"{k}={urllib.parse.quote(v, safe='')}" for k, v in items if v)


def _authority_ok(authority: str) -> bool:
    """ip:port or [ipv6]:port with a port in range (HBONE names an address, never a name)."""
    try:
        split_hostport(authority)
        return True
    except ValueError:
        return False
