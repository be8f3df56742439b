"""HTTP/2 as the mesh speaks it: the frames, stream states and flow control of RFC 9113 that a
CONNECT tunnel (HBONE) and a gRPC stream use, as a lean, conformant peer (the ``h2`` library did the same work through
a general state machine and four copies of every DATA frame: py-spy put most of a bulk
transfer's sending CPU there).

What it does, and what it leaves out:

* Every frame type is parsed and checked; connection errors raise :class:`ProtocolError`
  after queueing a GOAWAY with the RFC's error code, stream errors reset the stream (and
  report it as :class:`StreamReset`, so the relay releases its TCP side).
* DATA payloads are delivered as they arrive, as views of the received bytes (a piece
  smaller than half its chunk is copied: a view would pin the chunk): no frame is
  reassembled. A sent DATA frame over 64 KiB is a 9-byte header joined to the first 16 KiB
  of the payload (one full TLS record) and a view of the rest; a smaller one, one piece.
* Header blocks: HPACK in ``headers.py`` (ours never touch the dynamic table; a peer's
  through ``hpack``).
* No server push (a client says ENABLE_PUSH=0; a PUSH_PROMISE is a protocol error), no
  priorities (read and ignored, as RFC 9113 §5.3.2 allows), no padding sent.

Events carry h2's names and fields, so the relay reads the same with either.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from .headers import Decoder, HeaderError, encode_headers
from .headers import decode as decode_headers

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW, DEFAULT_FRAME = 65535, 16384
MAX_HEADER_BLOCK = 64 * 1024  # a header block (HEADERS and its CONTINUATIONs) larger is refused
RECORD = 16384  # a TLS record's payload: a DATA frame's header travels with its first bytes

_HDR = struct.Struct(">HBBBL")  # length (24 bits: 16 + 8), type, flags, stream id (31 bits)
_U32 = struct.Struct(">L")


class ErrorCodes(IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class ProtocolError(Exception):
    """A connection error: the peer broke the protocol; a GOAWAY with .code is queued."""

    def __init__(self, code: ErrorCodes, why: str):
        super().__init__(f"{code.name}: {why}")
        self.code = code


class StreamClosedError(Exception):
    """We were asked to act on a stream that is closed (or was never opened)."""


# ---- events (h2's names and fields) -----------------------------------------------------------


class Event:
    __slots__ = ()

    def __repr__(self):
        return f"<{type(self).__name__} " + " ".join(
            f"{k}={getattr(self, k)!r}" for k in self.__slots__
        ) + ">"  # fmt: skip


class RequestReceived(Event):
    __slots__ = ("stream_id", "headers")

    def __init__(self, stream_id, headers):
        self.stream_id, self.headers = stream_id, headers


class ResponseReceived(Event):
    __slots__ = ("stream_id", "headers")

    def __init__(self, stream_id, headers):
        self.stream_id, self.headers = stream_id, headers


class TrailersReceived(Event):
    __slots__ = ("stream_id", "headers")

    def __init__(self, stream_id, headers):
        self.stream_id, self.headers = stream_id, headers


class DataReceived(Event):
    __slots__ = ("stream_id", "data", "flow_controlled_length")

    def __init__(self, stream_id, data, flow_controlled_length):
        self.stream_id, self.data = stream_id, data
        self.flow_controlled_length = flow_controlled_length


class StreamEnded(Event):
    __slots__ = ("stream_id",)

    def __init__(self, stream_id):
        self.stream_id = stream_id


class StreamReset(Event):
    __slots__ = ("stream_id", "error_code", "remote_reset")

    def __init__(self, stream_id, error_code, remote_reset=True):
        self.stream_id, self.error_code, self.remote_reset = stream_id, error_code, remote_reset


class WindowUpdated(Event):
    __slots__ = ("stream_id",)

    def __init__(self, stream_id):
        self.stream_id = stream_id


class PingReceived(Event):
    __slots__ = ()


class RemoteSettingsChanged(Event):
    __slots__ = ()


class ConnectionTerminated(Event):
    __slots__ = ("error_code", "last_stream_id")

    def __init__(self, error_code, last_stream_id):
        self.error_code, self.last_stream_id = error_code, last_stream_id


# ---- streams and the connection -----------------------------------------------------------


class _Stream:
    __slots__ = ("send_win", "recv_win", "consumed", "local_closed", "remote_closed", "answered")

    def __init__(self, send_win: int, recv_win: int):
        self.send_win = send_win  # what the peer lets us send
        self.recv_win = recv_win  # what we let the peer send
        self.consumed = 0  # received and processed, not yet given back as WINDOW_UPDATE
        self.local_closed = False  # we sent END_STREAM
        self.remote_closed = False  # the peer sent END_STREAM
        self.answered = False  # a final response (client) / the request (server) was seen


class Connection:
    """One HTTP/2 connection's state: feed it received bytes, take what it has to send."""

    def __init__(self, client_side: bool, window: int, max_frame: int, max_streams: int):
        self.client_side = client_side
        self.local_window, self.local_max_frame = window, max_frame
        self.local_max_streams = max_streams
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_FRAME
        self.peer_max_streams = MAX_WINDOW  # unlimited until the peer says
        self.conn_send_win = DEFAULT_WINDOW
        self.conn_recv_win = DEFAULT_WINDOW
        self.conn_consumed = 0
        self.streams: dict[int, _Stream] = {}
        self.next_stream_id = 1 if client_side else 2
        self.highest_peer_id = 0
        self.goaway_sent = self.goaway_received = False
        self.terminated = False  # a connection error happened: nothing more is read
        self._out: list = []
        self._events: list = []
        # the reader
        self._preface = 0 if client_side else len(PREFACE)  # preface bytes still expected
        self._settings_seen = False
        self._buf = bytearray()
        self._frame = None  # (length, type, flags, stream) of a frame whose payload we collect
        self._data_left = 0  # bytes of an unpadded DATA frame's payload still to come
        self._data_st: _Stream | None = None
        self._data_sid = 0
        self._data_end = False
        self._block: bytearray | None = None  # a header block waiting for its CONTINUATIONs
        self._block_sid = self._block_flags = 0
        self.decoder = Decoder()

    # -- sending --------------------------------------------------------------------------

    def _emit(self, ftype: int, flags: int, sid: int, payload: bytes = b"") -> None:
        n = len(payload)
        self._out.append(_HDR.pack(n >> 8, n & 0xFF, ftype, flags, sid) + payload)

    def initiate_connection(self) -> None:
        """The client's preface, our SETTINGS, and the connection window opened to ours."""
        if self.client_side:
            self._out.append(PREFACE)
        settings = [
            (S_MAX_CONCURRENT_STREAMS, self.local_max_streams),
            (S_INITIAL_WINDOW_SIZE, self.local_window),
            (S_MAX_FRAME_SIZE, self.local_max_frame),
        ]
        if self.client_side:
            settings.insert(0, (S_ENABLE_PUSH, 0))
        self._emit(SETTINGS, 0, 0, b"".join(struct.pack(">HL", k, v) for k, v in settings))
        if self.local_window > DEFAULT_WINDOW:
            self._emit(WINDOW_UPDATE, 0, 0, _U32.pack(self.local_window - DEFAULT_WINDOW))
            self.conn_recv_win = self.local_window

    def data_to_send(self) -> list:
        """What is queued for the peer, as a list of bytes-like objects (small frames joined)."""
        out = self._out
        if not out:
            return out
        self._out = []
        if len(out) > 1 and sum(map(len, out)) <= RECORD:
            return [b"".join(out)]
        return out

    def get_next_available_stream_id(self) -> int:
        sid = self.next_stream_id
        if sid > MAX_WINDOW:
            raise StreamClosedError("stream ids exhausted on this connection")
        return sid

    def open_streams(self) -> int:
        return len(self.streams)

    def send_headers(self, sid: int, headers, end_stream: bool = False) -> None:
        st = self.streams.get(sid)
        if st is None:
            if not self.client_side or sid != self.next_stream_id:
                raise StreamClosedError(f"stream {sid} is not open")
            if self.goaway_received:
                raise StreamClosedError("the peer sent GOAWAY: no new stream")
            st = self.streams[sid] = _Stream(self.peer_initial_window, self.local_window)
            self.next_stream_id += 2
        elif st.local_closed:
            raise StreamClosedError(f"stream {sid} is closed for sending")
        block = encode_headers(headers)
        flags = END_STREAM if end_stream else 0
        first, rest = block[: self.peer_max_frame], block[self.peer_max_frame :]
        self._emit(HEADERS, flags | (0 if rest else END_HEADERS), sid, first)
        while rest:
            part, rest = rest[: self.peer_max_frame], rest[self.peer_max_frame :]
            self._emit(CONTINUATION, 0 if rest else END_HEADERS, sid, part)
        if end_stream:
            self._close_local(sid, st)

    def _sending(self, sid: int) -> _Stream:
        """sid's stream, open for sending; else StreamClosedError."""
        st = self.streams.get(sid)
        if st is None or st.local_closed:
            raise StreamClosedError(f"stream {sid} is closed")
        return st

    def local_flow_control_window(self, sid: int) -> int:
        return min(self.conn_send_win, self._sending(sid).send_win)

    @property
    def max_outbound_frame_size(self) -> int:
        return self.peer_max_frame

    def send_data(self, sid: int, data, end_stream: bool = False) -> None:
        """One DATA frame; the caller keeps within local_flow_control_window and the frame size."""
        st = self._sending(sid)
        n = len(data)
        if n > st.send_win or n > self.conn_send_win or n > self.peer_max_frame:
            raise ValueError(f"{n} bytes exceed the send window or the frame size")
        st.send_win -= n
        self.conn_send_win -= n
        flags = END_STREAM if end_stream else 0
        head = _HDR.pack(n >> 8, n & 0xFF, DATA, flags, sid)
        if n <= 4 * RECORD:  # a copy of at most 64 KiB: cheaper than another TLS record
            self._out.append(head + data)
        else:  # the header with the first record's worth, then the rest without a copy
            cut = RECORD - 9
            view = data if isinstance(data, memoryview) else memoryview(data)
            self._out.append(head + view[:cut])
            self._out.append(view[cut:])
        if end_stream:
            self._close_local(sid, st)

    def end_stream(self, sid: int) -> None:
        st = self._sending(sid)
        self._emit(DATA, END_STREAM, sid)
        self._close_local(sid, st)

    def _close_local(self, sid: int, st: _Stream) -> None:
        st.local_closed = True
        if st.remote_closed:
            del self.streams[sid]

    def reset_stream(self, sid: int, error_code: int = ErrorCodes.CANCEL) -> None:
        if self.streams.pop(sid, None) is None:
            raise StreamClosedError(f"stream {sid} is closed")
        self._emit(RST_STREAM, 0, sid, _U32.pack(error_code))

    def close_connection(self, error_code: int = ErrorCodes.NO_ERROR) -> None:
        self.goaway_sent = True
        self._emit(GOAWAY, 0, 0, struct.pack(">LL", self.highest_peer_id, error_code))

    def acknowledge_received_data(self, n: int, sid: int) -> None:
        """n bytes of sid's DATA were processed: give the windows back, in batches of a
        quarter window (or at once when a window ran low)."""
        self.conn_consumed += n
        if (
            self.conn_consumed >= self.local_window >> 2
            or self.conn_recv_win < self.local_window >> 1
        ):
            self._emit(WINDOW_UPDATE, 0, 0, _U32.pack(self.conn_consumed))
            self.conn_recv_win += self.conn_consumed
            self.conn_consumed = 0
        st = self.streams.get(sid)
        if st is None or st.remote_closed:
            return  # nothing more comes on it: no window to give back
        st.consumed += n
        if st.consumed >= self.local_window >> 2 or st.recv_win < self.local_window >> 1:
            self._emit(WINDOW_UPDATE, 0, sid, _U32.pack(st.consumed))
            st.recv_win += st.consumed
            st.consumed = 0

    def state(self, sid: int) -> str:
        st = self.streams.get(sid)
        if st is None:
            return "closed"
        if st.local_closed:
            return "half_closed_local"
        return "half_closed_remote" if st.remote_closed else "open"

    # -- receiving ------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list:
        """Parse what the peer sent; the events it makes, in order. A connection error queues
        a GOAWAY and raises ProtocolError; nothing more is read after it."""
        events = self._events = []
        if self.terminated:
            return events
        try:
            self._feed(data)
        except ProtocolError as e:
            self.terminated = True
            self.close_connection(e.code)
            raise
        return events

    def _stream_error(self, sid: int, code: ErrorCodes) -> None:
        """Reset sid (RFC 9113 §5.4.2) and tell the relay, which releases its side."""
        if self.streams.pop(sid, None) is not None:
            self._events.append(StreamReset(sid, code, remote_reset=False))
        self._emit(RST_STREAM, 0, sid, _U32.pack(code))

    def _idle(self, sid: int) -> bool:
        """sid names a stream not opened yet (by either side)."""
        ours = (sid & 1) == (1 if self.client_side else 0)
        return sid >= self.next_stream_id if ours else sid > self.highest_peer_id

    def _feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        if self._preface:
            take = min(self._preface, n)
            start = len(PREFACE) - self._preface
            if data[:take] != PREFACE[start : start + take]:
                raise ProtocolError(ErrorCodes.PROTOCOL_ERROR, "invalid connection preface")
            self._preface -= take
            pos = take
        view = None
        while pos < n:
            if self._data_left:  # inside an unpadded DATA frame's payload: pass it on
                if view is None:
                    view = memoryview(data)
                take = min(self._data_left, n - pos)
                self._data_left -= take
                if self._data_st is not None:
                    if take == n:
                        piece = data
                    elif take >= n >> 1:
                        piece = view[pos : pos + take]
                    else:
                        # a view holds the whole received chunk for as long as the relay
                        # holds the piece (a slow reader's transport, a flow not attached
                        # yet): a peer interleaving 1-byte frames for a stalled stream with
                        # large ones for another would pin 256 KiB per byte of window. Only
                        # a piece of at least half its chunk is passed as a view
                        piece = data[pos : pos + take]
                    self._events.append(DataReceived(self._data_sid, piece, take))
                else:
                    self.conn_consumed += take  # a closed stream's: the window comes back
                pos += take
                if not self._data_left:
                    self._data_done()
                continue
            if self._frame is None:  # a frame header
                if not self._buf and n - pos >= 9:
                    hi, lo, ftype, flags, sid = _HDR.unpack_from(data, pos)
                    pos += 9
                else:
                    take = min(9 - len(self._buf), n - pos)
                    self._buf += data[pos : pos + take]
                    pos += take
                    if len(self._buf) < 9:
                        return
                    hi, lo, ftype, flags, sid = _HDR.unpack(self._buf)
                    self._buf.clear()
                self._header((hi << 8) | lo, ftype, flags, sid & MAX_WINDOW)
                continue
            length = self._frame[0]  # the payload of a frame read whole
            if not self._buf and n - pos >= length:
                payload = data[pos : pos + length]
                pos += length
            else:
                take = min(length - len(self._buf), n - pos)
                self._buf += data[pos : pos + take]
                pos += take
                if len(self._buf) < length:
                    return
                payload = bytes(self._buf)
                self._buf.clear()
            _, ftype, flags, sid = self._frame
            self._frame = None
            self._payload(ftype, flags, sid, payload)

    def _header(self, length: int, ftype: int, flags: int, sid: int) -> None:
        if length > self.local_max_frame:
            raise ProtocolError(ErrorCodes.FRAME_SIZE_ERROR, f"a {length}-byte frame")
        if not self._settings_seen:
            if ftype != SETTINGS or flags & ACK:
                raise ProtocolError(
                    ErrorCodes.PROTOCOL_ERROR, "the peer's first frame not SETTINGS"
                )
            self._settings_seen = True
        if self._block is not None and (ftype != CONTINUATION or sid != self._block_sid):
            raise ProtocolError(ErrorCodes.PROTOCOL_ERROR, "a header block interrupted")
        if ftype == DATA and not flags & PADDED:
            self._data_header(length, flags, sid)
        elif length == 0:
            self._payload(ftype, flags, sid, b"")
        else:
            self._frame = (length, ftype, flags, sid)

    def _data_header(self, length: int, flags: int, sid: int) -> None:
        st = self._data_accept(length, sid)
        self._data_st, self._data_sid, self._data_end = st, sid, bool(flags & END_STREAM)
        self._data_left = length
        if not length:
            self._data_done()

    def _data_accept(self, length: int, sid: int) -> _Stream | None:
        """Account a DATA frame against the windows; its stream, or None to drop it."""
        if sid == 0:
            raise ProtocolError(ErrorCodes.PROTOCOL_ERROR, "DATA on stream 0")
        if length > self.conn_recv_win:
            raise ProtocolError(ErrorCodes.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.conn_recv_win -= length
        st = self.streams.get(sid)
        if st is None:
            if self._idle(sid):
                raise ProtocolError(ErrorCodes.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return None  # closed (by a reset, most likely in flight): ignored
        if st.remote_closed or not st.answered:
            self._stream_error(
                sid, ErrorCodes.STREAM_CLOSED if st.remote_closed else ErrorCodes.PROTOCOL_ERROR
            )
            return None
        if length > st.recv_win:
            self._stream_error(sid, ErrorCodes.FLOW_CONTROL_ERROR)
            return None
        st.recv_win -= length
        return st

    def _data_done(self) -> None:
        st, sid = self._data_st, self._data_sid
        self._data_st = None
        if st is not None and self._data_end and self.streams.get(sid) is st:
            self._remote_end(sid, st)
        self._maybe_give_back()

    def _remote_end(self, sid: int, st: _Stream) -> None:
        st.remote_closed = True
        if st.local_closed:
            del self.streams[sid]
        self._events.append(StreamEnded(sid))

    def _maybe_give_back(self) -> None:
        if self.conn_consumed >= self.local_window >> 2:
            self._emit(WINDOW_UPDATE, 0, 0, _U32.pack(self.conn_consumed))
            self.conn_recv_win += self.conn_consumed
            self.conn_consumed = 0

    def _payload(self, ftype: int, flags: int, sid: int, p: bytes) -> None:
        if ftype == DATA:  # padded (an unpadded one streams through _feed)
            st = self._data_accept(len(p), sid)
            if not p:
                raise ProtocolError(ErrorCodes.FRAME_SIZE_ERROR, "padded DATA without a pad length")
            pad = p[0]
            if pad >= len(p):
                raise ProtocolError(ErrorCodes.PROTOCOL_ERROR, "padding longer than the frame")
            body = p[1 : len(p) - pad]
            if st is None:
                self.conn_consumed += len(p)
            else:
                self.conn_consumed += len(p) - len(body)  # the padding's share comes back now
                st.recv_win += len(p) - len(body)
                if body:
                    self._events.append(DataReceived(sid, body, len(body)))
                if flags & END_STREAM and self.streams.get(sid) is st:
                    self._remote_end(sid, st)
            self._maybe_give_back()
        elif ftype == HEADERS:
            if sid == 0:
                raise ProtocolError(ErrorCodes.PROTOCOL_ERROR, "HEADERS on stream 0")
            start, end = 0, len(p)
            if flags & PADDED:
                if not p or p[0] >= len(p):
                    raise ProtocolError(ErrorCodes.PROTOCOL_ERROR, "bad HEADERS padding")
                start, end = 1, len(p) - p[0]
            if flags & PRIORITY_FLAG:
                start += 5
                if start > end:
                    raise ProtocolError(ErrorCodes.FRAME_SIZE_ERROR, "HEADERS too short")
            self._block_start(sid, flags, p[start:end])
        elif ftype == CONTINUATION:
            if self._block is None:
                raise ProtocolError(ErrorCodes.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            self._block += p
            if len(self._block) > MAX_HEADER_BLOCK:
                raise ProtocolError(ErrorCodes.ENHANCE_YOUR_CALM, "header block over 64 KiB")
            if flags & END_HEADERS:
                block, self._block = bytes(self._block), None
                self._headers(self._block_sid, self._block_flags, block)
        elif ftype == SETTINGS:
            self._settings(flags, sid, p)
        elif ftype == WINDOW_UPDATE:
            self._window_update(sid, p)
        elif ftype == RST_STREAM:
            if sid == 0 or len(p) != 4:
                raise ProtocolError(
                    ErrorCodes.PROTOCOL_ERROR if sid == 0 else ErrorCodes.FRAME_SIZE_ERROR,
                    "malformed RST_STREAM",
                )
            if self._idle(sid):
                raise ProtocolError(ErrorCodes.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            if self.streams.pop(sid, None) is not None:
                self._events.append(StreamReset(sid, _U32.unpack(p)[0]))
        elif ftype == PING:
            if sid != 0 or len(p) != 8:
                raise ProtocolError(
                    ErrorCodes.PROTOCOL_ERROR if sid else ErrorCodes.FRAME_SIZE_ERROR, "bad PING"
                )
            if not flags & ACK:
                self._emit(PING, ACK, 0, p)
                self._events.append(PingReceived())
        elif ftype == GOAWAY:
            if sid != 0 or len(p) < 8:
                raise ProtocolError(
                    ErrorCodes.PROTOCOL_ERROR if sid else ErrorCodes.FRAME_SIZE_ERROR, "bad GOAWAY"
                )
            last, code = struct.unpack_from(">LL", p)
            last &= MAX_WINDOW
            self.goaway_received = True
            self._events.append(ConnectionTerminated(code, last))
            # streams we opened above last were never seen by the peer: refused, safe to retry
            for s in [s for s in self.streams if s > last and (s & 1) == (self.client_side & 1)]:
                del self.streams[s]
                self._events.append(StreamReset(s, ErrorCodes.REFUSED_STREAM))
        elif ftype == PUSH_PROMISE:
            raise ProtocolError(ErrorCodes.PROTOCOL_ERROR, "PUSH_PROMISE (push is disabled)")
        elif ftype == PRIORITY:
            if sid == 0:
                raise ProtocolError(ErrorCodes.PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(p) != 5 and sid in self.streams:
                self._stream_error(sid, ErrorCodes.FRAME_SIZE_ERROR)
        # other types: extensions, ignored (RFC 9113 §5.5)

    def _block_start(self, sid: int, flags: int, fragment: bytes) -> None:
        if flags & END_HEADERS:
            self._headers(sid, flags, fragment)
        else:
            self._block, self._block_sid, self._block_flags = bytearray(fragment), sid, flags

    def _decode(self, block: bytes) -> list[tuple[str, str]]:
        try:
            return decode_headers(self.decoder, block)
        except HeaderError as e:
            raise ProtocolError(ErrorCodes.COMPRESSION_ERROR, f"header block: {e}") from None

    def _headers(self, sid: int, flags: int, block: bytes) -> None:
        headers = self._decode(block)  # always: the decoder's table must follow the peer's
        end = bool(flags & END_STREAM)
        st = self.streams.get(sid)
        if st is None:
            if self.client_side or (sid & 1) == 0:
                if self._idle(sid):
                    raise ProtocolError(ErrorCodes.PROTOCOL_ERROR, f"HEADERS on idle stream {sid}")
                return  # a closed stream's (reset by us, in flight): ignored
            if sid <= self.highest_peer_id:
                return  # a closed stream's
            self.highest_peer_id = sid
            if self.goaway_sent:
                return  # after our GOAWAY no new stream is taken (RFC 9113 §6.8)
            if len(self.streams) >= self.local_max_streams:
                self._emit(RST_STREAM, 0, sid, _U32.pack(ErrorCodes.REFUSED_STREAM))
                return
            st = self.streams[sid] = _Stream(self.peer_initial_window, self.local_window)
            st.answered = True
            self._events.append(RequestReceived(sid, headers))
            if end:
                self._remote_end(sid, st)
            return
        if st.remote_closed:
            self._stream_error(sid, ErrorCodes.STREAM_CLOSED)
            return
        if self.client_side and not st.answered:
            status = next((v for k, v in headers if k == ":status"), "")
            if status.startswith("1") and not end:
                return  # an informational response: the final one follows
            st.answered = True
            self._events.append(ResponseReceived(sid, headers))
        elif not end:  # trailers must end the stream
            self._stream_error(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        else:  # trailers (gRPC's status)
            self._events.append(TrailersReceived(sid, headers))
        if end:
            self._remote_end(sid, st)

    def _settings(self, flags: int, sid: int, p: bytes) -> None:
        if sid != 0:
            raise ProtocolError(ErrorCodes.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if p:
                raise ProtocolError(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(p) % 6:
            raise ProtocolError(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 bytes")
        grew = False
        for off in range(0, len(p), 6):
            key, value = struct.unpack_from(">HL", p, off)
            if key == S_ENABLE_PUSH and value > 1:
                raise ProtocolError(ErrorCodes.PROTOCOL_ERROR, f"ENABLE_PUSH={value}")
            elif key == S_MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value
            elif key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(
                        ErrorCodes.FLOW_CONTROL_ERROR, f"INITIAL_WINDOW_SIZE={value}"
                    )
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for st in self.streams.values():
                    st.send_win += delta
                    if st.send_win > MAX_WINDOW:
                        raise ProtocolError(
                            ErrorCodes.FLOW_CONTROL_ERROR, "a stream window overflows"
                        )
                grew = grew or delta > 0
            elif key == S_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= 2**24 - 1:
                    raise ProtocolError(ErrorCodes.PROTOCOL_ERROR, f"MAX_FRAME_SIZE={value}")
                self.peer_max_frame = value
            # HEADER_TABLE_SIZE: our blocks never use the dynamic table; others: advisory
        self._emit(SETTINGS, ACK, 0)
        self._events.append(RemoteSettingsChanged())
        if grew:
            self._events.append(WindowUpdated(0))

    def _window_update(self, sid: int, p: bytes) -> None:
        if len(p) != 4:
            raise ProtocolError(ErrorCodes.FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes")
        inc = _U32.unpack(p)[0] & MAX_WINDOW
        if sid == 0:
            if inc == 0:
                raise ProtocolError(ErrorCodes.PROTOCOL_ERROR, "a zero connection WINDOW_UPDATE")
            self.conn_send_win += inc
            if self.conn_send_win > MAX_WINDOW:
                raise ProtocolError(
                    ErrorCodes.FLOW_CONTROL_ERROR, "the connection window overflows"
                )
            self._events.append(WindowUpdated(0))
            return
        st = self.streams.get(sid)
        if st is None:
            if self._idle(sid):
                raise ProtocolError(
                    ErrorCodes.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}"
                )
            return
        if inc == 0:
            self._stream_error(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        st.send_win += inc
        if st.send_win > MAX_WINDOW:
            self._stream_error(sid, ErrorCodes.FLOW_CONTROL_ERROR)
            return
        self._events.append(WindowUpdated(sid))
