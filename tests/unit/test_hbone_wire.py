"""HBONE's own HTTP/2 (agent/http2/wire.py) against the h2 library as the other peer,
in memory: every frame one side writes, the other parses. Then what a hostile peer sends:
each connection error with its RFC 9113 code and a GOAWAY, each stream error with a reset.
(Envoy, a third implementation, talks to it in tests/cluster/test_envoy_hbone*.py.)"""

import os
import random
import struct

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.http2 import headers as hpk
from agent.http2 import wire

W = wire.ErrorCodes


def _h2(client_side: bool, **kw) -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=client_side,
            header_encoding="utf-8",
            validate_outbound_headers=False,
            validate_inbound_headers=False,
        )
    )
    c.initiate_connection()
    if kw:
        c.update_settings(kw)
    return c


def _ours(client_side: bool, window=1 << 24, max_frame=1 << 18, max_streams=1000):
    c = wire.Connection(client_side, window=window, max_frame=max_frame, max_streams=max_streams)
    c.initiate_connection()
    return c


class Pair:
    """Our connection and an h2 one, wired back to back; events collected per side."""

    def __init__(self, ours_client: bool, split: int = 0, **kw):
        self.ours = _ours(ours_client, **kw)
        self.theirs = _h2(not ours_client)
        self.ours_events, self.theirs_events = [], []
        self.split = split  # feed our side in pieces of this many bytes (0: whole)
        self.ours_acked = self.theirs_acked = 0

    def pump(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            a = b"".join(bytes(x) for x in self.ours.data_to_send())
            b = self.theirs.data_to_send()
            if not a and not b:
                return
            if a:
                self.theirs_events += self.theirs.receive_data(a)
            if b:
                if self.split:
                    for i in range(0, len(b), self.split):
                        self.ours_events += self.ours.receive_data(b[i : i + self.split])
                else:
                    self.ours_events += self.ours.receive_data(b)
        raise AssertionError("the two sides never went quiet")

    def ours_data(self, sid: int) -> bytes:
        return b"".join(
            bytes(e.data)
            for e in self.ours_events
            if isinstance(e, wire.DataReceived) and e.stream_id == sid
        )

    def theirs_data(self, sid: int) -> bytes:
        return b"".join(
            e.data
            for e in self.theirs_events
            if isinstance(e, h2.events.DataReceived) and e.stream_id == sid
        )


def _send(c, sid: int, data: bytes) -> int:
    """Send what the windows allow, as the relay does (either implementation: the same
    methods); how much was sent."""
    off = 0
    while off < len(data):
        n = min(c.local_flow_control_window(sid), c.max_outbound_frame_size, len(data) - off)
        if n <= 0:
            break
        c.send_data(sid, data[off : off + n])
        off += n
    return off


def _ack_both(p: Pair) -> None:
    """Each side's relay took what it received: acknowledge it (once)."""
    for e in p.ours_events[p.ours_acked :]:
        if isinstance(e, wire.DataReceived):
            p.ours.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
    p.ours_acked = len(p.ours_events)
    for e in p.theirs_events[p.theirs_acked :]:
        if isinstance(e, h2.events.DataReceived):
            p.theirs.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
    p.theirs_acked = len(p.theirs_events)


@pytest.mark.parametrize("split", [0, 1, 7])
def test_trailers_after_a_response_reach_the_client_as_trailers(split):
    """gRPC's status comes in trailers (a HEADERS frame ending the stream after the data);
    the agent's control-plane client reads it there. A trailers-only answer is a response."""
    p = Pair(ours_client=True, split=split)
    p.pump()
    req = [(":method", "POST"), (":scheme", "https"), (":path", "/s/M"), (":authority", "c")]
    for sid in (1, 3):
        p.ours.send_headers(sid, req, end_stream=True)
    p.pump()
    p.theirs.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    p.theirs.send_data(1, b"\x00\x00\x00\x00\x02hi")
    p.theirs.send_headers(1, [("grpc-status", "7"), ("grpc-message", "no%20way")],
                          end_stream=True)  # fmt: skip
    p.theirs.send_headers(3, [(":status", "200"), ("grpc-status", "12")], end_stream=True)
    p.pump()
    got = [(type(e).__name__, e.stream_id, getattr(e, "headers", None)) for e in p.ours_events
           if not isinstance(e, wire.RemoteSettingsChanged | wire.DataReceived)]  # fmt: skip
    assert got == [
        ("ResponseReceived", 1, [(":status", "200"), ("content-type", "application/grpc")]),
        ("TrailersReceived", 1, [("grpc-status", "7"), ("grpc-message", "no%20way")]),
        ("StreamEnded", 1, None),
        ("ResponseReceived", 3, [(":status", "200"), ("grpc-status", "12")]),
        ("StreamEnded", 3, None),
    ]
    assert p.ours_data(1) == b"\x00\x00\x00\x00\x02hi"


@pytest.mark.parametrize("split", [0, 1, 7, 4096])
def test_a_connect_flow_with_h2_as_the_client_carries_exact_bytes_both_ways(split):
    p = Pair(ours_client=False, split=split)
    p.pump()
    # h2's encoder uses Huffman codes and its dynamic table: decoded through hpack
    p.theirs.send_headers(
        1, [(":method", "CONNECT"), (":authority", "10.0.0.1:8080"), ("forwarded", "for=10.1.1.1")]
    )
    p.pump()
    reqs = [e for e in p.ours_events if isinstance(e, wire.RequestReceived)]
    assert [(r.stream_id, r.headers) for r in reqs] == [
        (
            1,
            [
                (":method", "CONNECT"),
                (":authority", "10.0.0.1:8080"),
                ("forwarded", "for=10.1.1.1"),
            ],
        )
    ]
    p.ours.send_headers(1, [(":status", "200")])
    p.pump()
    resp = [e for e in p.theirs_events if isinstance(e, h2.events.ResponseReceived)]
    assert resp[0].headers == [(":status", "200")]
    up, down = os.urandom(3_000_001), os.urandom(5_000_003)
    sent_up = sent_down = 0
    for _ in range(200):
        sent_up += _send(p.theirs, 1, up[sent_up:])
        sent_down += _send(p.ours, 1, down[sent_down:])
        p.pump()
        _ack_both(p)
        p.pump()
        if sent_up == len(up) and sent_down == len(down):
            break
    p.theirs.end_stream(1)
    p.ours.end_stream(1)
    p.pump()
    assert p.ours_data(1) == up
    assert p.theirs_data(1) == down
    assert any(isinstance(e, wire.StreamEnded) and e.stream_id == 1 for e in p.ours_events)
    assert any(isinstance(e, h2.events.StreamEnded) for e in p.theirs_events)
    assert p.ours.state(1) == "closed" and 1 not in p.ours.streams


def test_our_client_against_an_h2_server_small_windows_and_frames():
    """h2 as the server with a 65,535-byte window and 16 KiB frames: we split and wait."""
    p = Pair(ours_client=True)
    p.theirs.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 10})
    p.pump()
    sid = p.ours.get_next_available_stream_id()
    assert sid == 1
    p.ours.send_headers(sid, [(":method", "CONNECT"), (":authority", "[fd00::1]:443")])
    p.pump()
    req = [e for e in p.theirs_events if isinstance(e, h2.events.RequestReceived)][0]
    assert req.headers == [(":method", "CONNECT"), (":authority", "[fd00::1]:443")]
    p.theirs.send_headers(sid, [(":status", "200"), ("x-reason", "ok")])
    p.pump()
    assert [e.headers for e in p.ours_events if isinstance(e, wire.ResponseReceived)] == [
        [(":status", "200"), ("x-reason", "ok")]
    ]
    assert p.ours.max_outbound_frame_size == 16384 and p.ours.peer_max_streams == 10
    data, sent = os.urandom(1_000_000), 0
    for _ in range(100):
        sent += _send(p.ours, sid, data[sent:])
        p.pump()
        _ack_both(p)
        p.pump()
        if sent == len(data):
            break
    assert p.theirs_data(sid) == data
    assert p.ours.get_next_available_stream_id() == 3


def test_padded_data_continuations_trailers_and_informational_responses():
    p = Pair(ours_client=True)
    p.pump()
    p.ours.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    p.pump()
    p.theirs.send_headers(1, [(":status", "100")])  # informational: not the answer
    big = "v" * 40_000  # over 16 KiB: h2 continues the block in CONTINUATION frames
    p.theirs.send_headers(1, [(":status", "200"), ("x-big", big)])
    p.theirs.send_data(1, b"padded!", pad_length=20)
    p.theirs.send_headers(1, [("x-trailer", "t")], end_stream=True)
    p.pump()
    kinds = [type(e).__name__ for e in p.ours_events]
    assert kinds.count("ResponseReceived") == 1
    (resp,) = [e for e in p.ours_events if isinstance(e, wire.ResponseReceived)]
    assert resp.headers == [(":status", "200"), ("x-big", big)]
    assert p.ours_data(1) == b"padded!"
    assert kinds[-1] == "StreamEnded"
    # the padding's window came back without the relay acknowledging it
    assert p.ours.state(1) == "half_closed_remote"


def test_a_large_data_frame_is_sent_as_one_full_record_and_a_view_of_the_rest():
    c = _ours(client_side=True)
    c.receive_data(  # the peer's settings: 256 KiB frames, 1 MiB windows
        _frame(wire.SETTINGS, 0, 0, struct.pack(">HLHL", 5, 1 << 18, 4, 1 << 20))
        + _frame(wire.WINDOW_UPDATE, 0, 0, struct.pack(">L", (1 << 20) - 65535))
    )
    c.data_to_send()
    c.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    c.data_to_send()
    payload = os.urandom(200_000)
    c.send_data(1, payload)
    first, rest = c.data_to_send()
    assert len(first) == wire.RECORD  # 9-byte header + the first 16,375 bytes: one TLS record
    assert first[:9] == struct.pack(">HBBBL", 200_000 >> 8, 200_000 & 0xFF, 0, 0, 1)
    assert first[9:] == payload[: wire.RECORD - 9]
    assert isinstance(rest, memoryview) and rest.obj is payload  # not a copy
    assert bytes(rest) == payload[wire.RECORD - 9 :]
    c.send_data(1, b"small")
    (one,) = c.data_to_send()
    assert one == struct.pack(">HBBBL", 0, 5, 0, 0, 1) + b"small"
    # a full 16 KiB frame (Envoy's size) goes whole: no 9-byte TLS record after each
    c.send_data(1, payload[:16384])
    (one,) = c.data_to_send()
    assert one == struct.pack(">HBBBL", 16384 >> 8, 0, 0, 0, 1) + payload[:16384]


def test_windows_come_back_in_quarter_window_batches():
    c = _ours(client_side=False, window=1 << 20)
    c.receive_data(wire.PREFACE + _frame(wire.SETTINGS, 0, 0))
    c.receive_data(_frame(wire.HEADERS, wire.END_HEADERS, 1, hpk.encode_headers(
        [(":method", "CONNECT"), (":authority", "10.0.0.1:1")])))  # fmt: skip
    c.data_to_send()
    c.receive_data(_frame(wire.DATA, 0, 1, b"x" * 100_000))
    c.acknowledge_received_data(100_000, 1)
    assert c.data_to_send() == []  # under a quarter of the window: nothing yet
    for _ in range(2):
        c.receive_data(_frame(wire.DATA, 0, 1, b"x" * 100_000))
        c.acknowledge_received_data(100_000, 1)
    (out,) = c.data_to_send()
    updates = _frames(out)
    assert updates == [
        (wire.WINDOW_UPDATE, 0, 0, struct.pack(">L", 300_000)),
        (wire.WINDOW_UPDATE, 0, 1, struct.pack(">L", 300_000)),
    ]


def test_goaway_refuses_the_streams_the_server_never_saw():
    p = Pair(ours_client=True)
    p.pump()
    for sid in (1, 3, 5):
        p.ours.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    p.pump()
    p.theirs.close_connection(last_stream_id=3)
    p.pump()
    refused = [e.stream_id for e in p.ours_events if isinstance(e, wire.StreamReset)]
    assert refused == [5]
    assert [e.error_code for e in p.ours_events if isinstance(e, wire.StreamReset)] == [
        W.REFUSED_STREAM
    ]
    assert p.ours.goaway_received
    with pytest.raises(wire.StreamClosedError):
        p.ours.send_headers(7, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])


def test_ping_and_settings_are_answered():
    c = _ours(client_side=False)
    c.data_to_send()
    ev = c.receive_data(
        wire.PREFACE + _frame(wire.SETTINGS, 0, 0) + _frame(wire.PING, 0, 0, b"12345678")
    )
    assert [type(e).__name__ for e in ev] == ["RemoteSettingsChanged", "PingReceived"]
    (out,) = c.data_to_send()
    assert _frames(out) == [
        (wire.SETTINGS, wire.ACK, 0, b""),
        (wire.PING, wire.ACK, 0, b"12345678"),
    ]


# ---- what a hostile peer sends ----------------------------------------------------------------


def _frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBL", n >> 8, n & 0xFF, ftype, flags, sid) + payload


def _frames(data: bytes) -> list:
    out, pos = [], 0
    while pos < len(data):
        hi, lo, t, f, s = struct.unpack_from(">HBBBL", data, pos)
        n = (hi << 8) | lo
        out.append((t, f, s, data[pos + 9 : pos + 9 + n]))
        pos += 9 + n
    return out


HELLO = wire.PREFACE + _frame(wire.SETTINGS, 0, 0)
OPEN1 = _frame(
    wire.HEADERS,
    wire.END_HEADERS,
    1,
    hpk.encode_headers([(":method", "CONNECT"), (":authority", "10.0.0.1:1")]),
)

CONNECTION_ERRORS = [
    ("bad preface", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", W.PROTOCOL_ERROR),
    ("first frame not SETTINGS", wire.PREFACE + _frame(wire.PING, 0, 0, b"x" * 8), W.PROTOCOL_ERROR),
    ("DATA on stream 0", HELLO + _frame(wire.DATA, 0, 0, b"x"), W.PROTOCOL_ERROR),
    ("DATA on an idle stream", HELLO + _frame(wire.DATA, 0, 7, b"x"), W.PROTOCOL_ERROR),
    ("frame over our max", HELLO + struct.pack(">HBBBL", 0x0400, 1, 0, 0, 1), W.FRAME_SIZE_ERROR),
    ("HEADERS on an even id", HELLO + OPEN1.replace(b"\x00\x00\x00\x01", b"\x00\x00\x00\x02", 1), W.PROTOCOL_ERROR),
    ("PUSH_PROMISE", HELLO + _frame(wire.PUSH_PROMISE, 4, 1, b"\0\0\0\2"), W.PROTOCOL_ERROR),
    ("CONTINUATION alone", HELLO + _frame(wire.CONTINUATION, 4, 1, b""), W.PROTOCOL_ERROR),
    ("header block interrupted", HELLO + _frame(wire.HEADERS, 0, 1, b"\x82") + _frame(wire.PING, 0, 0, b"x" * 8), W.PROTOCOL_ERROR),
    ("zero connection WINDOW_UPDATE", HELLO + _frame(wire.WINDOW_UPDATE, 0, 0, b"\0\0\0\0"), W.PROTOCOL_ERROR),
    ("connection window overflow", HELLO + _frame(wire.WINDOW_UPDATE, 0, 0, b"\x7f\xff\xff\xff"), W.FLOW_CONTROL_ERROR),
    ("SETTINGS with a bad frame size", HELLO + _frame(wire.SETTINGS, 0, 0, struct.pack(">HL", 5, 100)), W.PROTOCOL_ERROR),
    ("SETTINGS of 5 bytes", HELLO + _frame(wire.SETTINGS, 0, 0, b"\0" * 5), W.FRAME_SIZE_ERROR),
    ("SETTINGS ACK with a body", HELLO + _frame(wire.SETTINGS, 1, 0, b"\0" * 6), W.FRAME_SIZE_ERROR),
    ("initial window too large", HELLO + _frame(wire.SETTINGS, 0, 0, struct.pack(">HL", 4, 2**31)), W.FLOW_CONTROL_ERROR),
    ("PING of 7 bytes", HELLO + _frame(wire.PING, 0, 0, b"x" * 7), W.FRAME_SIZE_ERROR),
    ("RST_STREAM on an idle stream", HELLO + _frame(wire.RST_STREAM, 0, 9, b"\0\0\0\1"), W.PROTOCOL_ERROR),
    ("GOAWAY on a stream", HELLO + _frame(wire.GOAWAY, 0, 1, b"\0" * 8), W.PROTOCOL_ERROR),
    ("a broken header block", HELLO + _frame(wire.HEADERS, 4, 1, b"\xff\xff\xff\xff\xff"), W.COMPRESSION_ERROR),
    ("a header block over 64 KiB", HELLO + _frame(wire.HEADERS, 0, 1, b"\x82" * 16000) + _frame(wire.CONTINUATION, 0, 1, b"\x82" * 50000), W.ENHANCE_YOUR_CALM),
    ("connection window exceeded", HELLO + OPEN1 + _frame(wire.DATA, 0, 1, b"x" * 70000), W.FLOW_CONTROL_ERROR),
]  # fmt: skip


@pytest.mark.parametrize("why,data,code", CONNECTION_ERRORS, ids=[c[0] for c in CONNECTION_ERRORS])
def test_connection_errors_end_in_goaway_with_the_rfcs_code(why, data, code):
    c = _ours(client_side=False, window=65535)
    c.data_to_send()
    with pytest.raises(wire.ProtocolError) as e:
        c.receive_data(data)
    assert e.value.code == code
    frames = _frames(b"".join(bytes(x) for x in c.data_to_send()))
    assert frames[-1][0] == wire.GOAWAY
    assert struct.unpack(">LL", frames[-1][3])[1] == code
    assert c.receive_data(b"anything after it") == []  # nothing more is read


STREAM_ERRORS = [
    ("DATA past the stream window", OPEN1 + _frame(wire.DATA, 0, 1, b"x" * 40000) * 2, W.FLOW_CONTROL_ERROR),
    ("DATA after END_STREAM", OPEN1 + _frame(wire.DATA, 1, 1, b"x") + _frame(wire.DATA, 0, 1, b"y"), W.STREAM_CLOSED),
    ("trailers without END_STREAM", OPEN1 + _frame(wire.HEADERS, 4, 1, b"\x82"), W.PROTOCOL_ERROR),
    ("a zero stream WINDOW_UPDATE", OPEN1 + _frame(wire.WINDOW_UPDATE, 0, 1, b"\0\0\0\0"), W.PROTOCOL_ERROR),
    ("a stream window overflow", OPEN1 + _frame(wire.WINDOW_UPDATE, 0, 1, b"\x7f\xff\xff\xff"), W.FLOW_CONTROL_ERROR),
]  # fmt: skip


@pytest.mark.parametrize("why,data,code", STREAM_ERRORS, ids=[c[0] for c in STREAM_ERRORS])
def test_stream_errors_reset_that_stream_only(why, data, code):
    c = _ours(client_side=False, window=65535)
    c.conn_recv_win = 1 << 20  # room on the connection: the stream's own window decides
    c.data_to_send()
    ev = c.receive_data(HELLO + data)
    resets = [e for e in ev if isinstance(e, wire.StreamReset)]
    assert [(e.stream_id, e.error_code, e.remote_reset) for e in resets] == [(1, code, False)]
    frames = _frames(b"".join(bytes(x) for x in c.data_to_send()))
    assert (wire.RST_STREAM, 0, 1, struct.pack(">L", code)) in frames
    assert 1 not in c.streams
    ev = c.receive_data(  # the connection goes on
        _frame(
            wire.HEADERS, 4, 3, hpk.encode_headers([(":method", "CONNECT"), (":authority", "a:1")])
        )
    )
    assert [e.stream_id for e in ev if isinstance(e, wire.RequestReceived)] == [3]


def test_streams_over_our_limit_are_refused_not_opened():
    c = _ours(client_side=False, max_streams=2)
    c.receive_data(HELLO)
    c.data_to_send()
    ev = []
    for sid in (1, 3, 5):
        ev += c.receive_data(OPEN1.replace(b"\x00\x00\x00\x01", struct.pack(">L", sid), 1))
    assert [e.stream_id for e in ev if isinstance(e, wire.RequestReceived)] == [1, 3]
    (out,) = c.data_to_send()
    assert _frames(out) == [(wire.RST_STREAM, 0, 5, struct.pack(">L", W.REFUSED_STREAM))]


def test_frames_on_streams_we_reset_are_ignored():
    c = _ours(client_side=False)
    c.receive_data(HELLO + OPEN1)
    c.reset_stream(1, W.CONNECT_ERROR)
    ev = c.receive_data(
        _frame(wire.DATA, 0, 1, b"late") + _frame(wire.WINDOW_UPDATE, 0, 1, b"\0\0\0\1")
    )
    assert ev == []
    with pytest.raises(wire.StreamClosedError):
        c.send_data(1, b"x")


def test_every_split_of_the_input_gives_the_same_events():
    p = Pair(ours_client=False)
    p.theirs.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:8080")])
    p.theirs.send_data(1, b"a" * 5000, pad_length=3)
    p.theirs.send_data(1, b"b" * 16000)
    p.theirs.ping(b"pingping")
    p.theirs.send_headers(
        3, [(":method", "CONNECT"), (":authority", "10.0.0.2:1")], end_stream=True
    )
    data = p.theirs.data_to_send()

    def run(pieces):
        c = _ours(client_side=False)
        ev = []
        for piece in pieces:
            ev += c.receive_data(piece)
        merged, out = [], []
        for e in ev:  # DATA arrives in as many pieces as the input: compare it joined
            if isinstance(e, wire.DataReceived) and merged and merged[-1][0] == "data":
                merged[-1] = ("data", e.stream_id, merged[-1][2] + bytes(e.data))
            elif isinstance(e, wire.DataReceived):
                merged.append(("data", e.stream_id, bytes(e.data)))
            else:
                merged.append((type(e).__name__, getattr(e, "stream_id", None)))
        out = b"".join(bytes(x) for x in c.data_to_send())
        return merged, out

    whole = run([data])
    rng = random.Random(7)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 40)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        assert run(pieces) == whole
    assert run([data[i : i + 1] for i in range(len(data))]) == whole


# ---- HPACK ------------------------------------------------------------------------------------

header = st.tuples(
    st.sampled_from([":method", ":authority", ":status", ":path", "forwarded", "dabba-reason"])
    | st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20),
    st.sampled_from(["CONNECT", "GET", "200", "403", "/", ""]) | st.text(max_size=300),
)


@settings(max_examples=200, deadline=None)
@given(headers=st.lists(header, max_size=8))
def test_our_header_blocks_decode_the_same_in_hpack_and_in_our_short_path(headers):
    block = hpk.encode_headers(headers)
    want = [(k, v) for k, v in headers]
    assert hpack.Decoder().decode(block) == want
    got = hpk.decode_plain(block)
    assert got is not None
    assert [(bytes(k).decode(), bytes(v).decode()) for k, v in got] == want


def test_the_short_path_leaves_huffman_and_the_dynamic_table_to_hpack():
    enc = hpack.Encoder()
    block = enc.encode([(":method", "CONNECT"), (":authority", "10.0.0.1:1")])
    assert hpk.decode_plain(block) is None  # Huffman / incremental indexing
    assert hpk.decode_plain(b"\x88") == [(b":status", b"200")]
    assert hpk.decode_plain(b"\xbe") is None  # index 62: the dynamic table
    assert hpk.decode_plain(b"\x00\x05ab") is None  # truncated


def test_small_data_pieces_do_not_pin_the_chunks_they_came_in():
    """A hostile peer interleaves 1-byte DATA frames for a stream whose reader is stalled with
    large frames for another: had every piece been a view, each byte held (until the stalled
    reader drains) would pin its whole received chunk, 256 KiB per byte of window. Pieces are
    views only when they are at least half their chunk."""
    c = _ours(client_side=False)
    c.receive_data(HELLO + OPEN1 + OPEN1.replace(b"\x00\x00\x00\x01", b"\x00\x00\x00\x03", 1))
    big = os.urandom(200_000)
    ev = []
    for _ in range(3):  # chunks as TLS hands them over, each a small frame and a large one
        ev += c.receive_data(_frame(wire.DATA, 0, 1, b"x") + _frame(wire.DATA, 0, 3, big))
    pieces = [e.data for e in ev if isinstance(e, wire.DataReceived)]
    assert [bytes(p) for p in pieces] == [b"x", big] * 3
    for p in pieces:
        if isinstance(p, memoryview):
            assert len(p) * 2 >= len(p.obj), (len(p), len(p.obj))
    assert any(isinstance(p, memoryview) for p in pieces)  # the large ones are not copied
