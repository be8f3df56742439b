"""Malformed HTTP/2 and CONNECT requests against a real HBONE listener (hypothesis-generated).

The listener runs in its own thread and event loop with real TLS; every
example opens a real mutual-TLS connection as a valid workload and sends
what hypothesis made. Whatever arrives, the listener must answer with a
status, a reset or a closed connection -- never crash, never leak the
connection, never stop serving the next client.
"""

import asyncio
import socket
import ssl
import threading
import time

import h2.config
import h2.connection
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.control import ca as camod
from agent.ztunnel import hbone, inbound, listeners, tls
from tests.unit.test_hbone import CLIENT, SERVER, TD, _issue

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class _Server:
    def __init__(self, tmp):
        ca = camod.CA.load_or_create(str(tmp / "ca"), TD)
        self.files = {i: _issue(ca, str(tmp), i) for i in (CLIENT, SERVER)}
        self.bundle = ca.bundle_pem()
        self.errors = []  # anything the loop's exception handler saw
        self.seen = []  # (method, authority) of every flow the listener opened
        self.base_open = hbone.TcpSide.open
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(
            lambda _l, ctx: self.errors.append(
                f"{ctx.get('message')}: {ctx.get('exception')!r} {ctx.get('task')!r}"
            )
        )
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)

        async def start():
            async def echo(r, w):
                try:
                    while data := await r.read(65536):
                        w.write(data)
                except ConnectionError:
                    pass  # fuzzed flows get reset: that is the echo's business, not the listener's
                w.close()

            self.echo = await asyncio.start_server(echo, "127.0.0.1", 0)
            ids = tls.ServerIdentities(TD, self.bundle)
            ids.set(SERVER, *self.files[SERVER])

            async def on_connect(authority, client_id, client_ip):
                self.seen.append(("CONNECT", authority))  # the server calls us for CONNECT only
                host, port = authority.rsplit(":", 1)
                return await hbone.dial_tcp(host, int(port), timeout=1)

            self.listener = inbound.serve(
                listeners.bind(("127.0.0.1", 0), "HBONE"), ids, on_connect, handshake_timeout=1
            )
            self.port = self.listener.sock.getsockname()[1]
            self.echo_port = self.echo.sockets[0].getsockname()[1]

        self.loop.run_until_complete(start())
        ready.set()
        self.loop.run_forever()

    def client(self) -> ssl.SSLSocket:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cadata=self.bundle.decode())
        ctx.check_hostname = False
        ctx.load_cert_chain(*self.files[CLIENT])
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        return ctx.wrap_socket(raw, server_hostname=tls.sni_for(SERVER))

    def live(self) -> int:
        """Open HBONE server connections (h2 state machines) in the loop."""
        fut = asyncio.run_coroutine_threadsafe(self._live(), self.loop)
        return fut.result(5)

    async def _live(self):
        return (
            sum(
                1
                for t in asyncio.all_tasks()
                if "_handshake" in repr(t.get_coro())  # handshakes still running
            )
            + (hbone.TcpSide.open - self.base_open)  # other tests' closed loops leave some
        )

    def detail(self):
        async def d():
            return [repr(t.get_coro())[:120] for t in asyncio.all_tasks()], hbone.TcpSide.open

        return asyncio.run_coroutine_threadsafe(d(), self.loop).result(5)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = _Server(tmp_path_factory.mktemp("fuzz"))
    yield s
    s.stop()


def _drain(sock: ssl.SSLSocket, limit: float = 1.0) -> bytes:
    """Read what the server answers until it closes or goes quiet."""
    sock.settimeout(0.2)
    got, end = b"", time.monotonic() + limit
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except (OSError, ssl.SSLError):
            break
        if not chunk:
            break
        got += chunk
    return got


def _good_flow(server) -> bytes:
    """A well-formed CONNECT to the echo server, through the same listener."""
    s = server.client()
    c = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, validate_inbound_headers=False
        )
    )
    c.initiate_connection()
    c.send_headers(
        1,
        [(":method", "CONNECT"), (":authority", f"127.0.0.1:{server.echo_port}")],
    )
    s.sendall(c.data_to_send())
    c.send_data(1, b"ping")
    s.sendall(c.data_to_send())
    s.settimeout(5)
    got = b""
    end = time.monotonic() + 5
    while time.monotonic() < end and b"ping" not in got:
        data = s.recv(65536)
        if not data:
            break
        for ev in c.receive_data(data):
            if hasattr(ev, "data") and ev.data:
                got += ev.data
        s.sendall(c.data_to_send())
    s.close()
    return got


def _frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes([ftype, flags])
        + stream.to_bytes(4, "big")
        + payload
    )


frames = st.lists(
    st.builds(
        _frame,
        st.integers(0, 12),  # DATA .. CONTINUATION, and unknown types
        st.integers(0, 255),
        st.integers(0, 9),
        st.binary(max_size=64),
    ),
    max_size=6,
)

SETTINGS = dict(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@settings(**SETTINGS)
@given(data=st.binary(max_size=300))
def test_garbage_after_the_preface(server, data):
    s = server.client()
    s.sendall(PREFACE + data)
    _drain(s)
    s.close()


@settings(**SETTINGS)
@given(fs=frames)
def test_random_frames(server, fs):
    s = server.client()
    s.sendall(PREFACE + _frame(4, 0, 0, b"") + b"".join(fs))
    _drain(s)
    s.close()


names = st.sampled_from([":method", ":authority", ":path", ":scheme", ":status", "forwarded", "x"])
values = st.one_of(
    st.sampled_from(["CONNECT", "GET", "127.0.0.1:1", "10.0.0.1:99999", "[::1]:80", "a:b", ""]),
    st.text(max_size=40),
)


@settings(**SETTINGS)
@given(headers=st.lists(st.tuples(names, values), max_size=6), end=st.booleans())
def test_malformed_connect_requests(server, headers, end):
    s = server.client()
    c = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    )
    c.initiate_connection()
    try:
        c.send_headers(1, headers, end_stream=end)
    except Exception:
        s.close()
        return  # h2 itself could not encode it: nothing to send
    s.sendall(c.data_to_send())
    _drain(s)
    s.close()
    # only a CONNECT to a plain IPv4 host:port ever reaches the flow callback
    assert all(m == "CONNECT" and hbone._authority_ok(a) for m, a in server.seen)


def test_a_client_that_stalls_mid_handshake_is_cut_and_counted(server):
    before = server.listener.refused.get("timeout", 0)
    raw = socket.create_connection(("127.0.0.1", server.port))
    raw.sendall(b"\x16\x03\x01\x00\xff")  # the start of a ClientHello, then nothing
    raw.settimeout(5)
    t = time.monotonic()
    assert raw.recv(100) == b""  # the server closes it...
    assert 0.8 < time.monotonic() - t < 4  # ...after its 1 s handshake timeout
    raw.close()
    deadline = time.monotonic() + 2
    while server.listener.refused.get("timeout", 0) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.listener.refused.get("timeout", 0) == before + 1


def test_after_all_that_the_listener_still_serves_and_holds_nothing(server):
    assert _good_flow(server) == b"ping"
    deadline = time.monotonic() + 5
    while server.live() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.live() == 0, server.detail()  # every fuzzed connection and flow was released
    assert server.errors == []  # and the loop never saw an unhandled error


# ---- a hostile peer's floods: bounded, counted, and the listener goes on serving --------------


def _h2_client():
    c = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, validate_inbound_headers=False
        )
    )
    c.initiate_connection()
    return c


def _refused(server) -> dict:
    async def r():
        return dict(server.listener.refused)

    return asyncio.run_coroutine_threadsafe(r(), server.loop).result(5)


def _unsent(server) -> list[int]:
    """Bytes each of the server's connections holds unsent."""

    async def u():
        return [c.transport.get_write_buffer_size() for c in server.listener.conns
                if c.transport and not c.transport.is_closing()] or [0]  # fmt: skip

    return asyncio.run_coroutine_threadsafe(u(), server.loop).result(5)


def test_a_peer_that_pings_and_never_reads_is_cut_off(server):
    """Before: every PING got its ACK queued, and a client that never read grew the server's
    memory without bound. Now, past 1 MiB unsent, 1,000 more answers close the connection."""
    s = server.client()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # read nothing, hold little
    before = _refused(server).get("flood", 0)
    c = _h2_client()
    s.sendall(c.data_to_send())
    ping = _frame(6, 0, 0, b"12345678")
    sent, closed = 0, False
    s.settimeout(60)  # a busy machine is slow: only a server that stops reading times out
    while sent < 2_000_000:  # 34 MB of ACKs, if none were refused
        try:
            s.sendall(ping * 1000)
        except (OSError, ssl.SSLError):  # reset by the server (or 60 s without reading)
            closed = True
            break
        sent += 1000
    assert closed, f"{sent} PINGs taken without reading"
    wait = time.monotonic() + 5
    while _refused(server).get("flood", 0) == before and time.monotonic() < wait:
        time.sleep(0.05)
    if _refused(server).get("flood", 0) == before:
        # on a loaded machine the server may stop reading first (the client's sends then
        # time out): what it holds for this client must still be bounded
        assert max(_unsent(server)) <= hbone.MAX_UNSENT, _unsent(server)
    else:
        assert _refused(server).get("flood", 0) == before + 1
    assert b"ping" in _good_flow(server)  # the listener goes on


def test_connect_then_reset_storms_start_no_more_than_the_cap_and_close(server):
    """Before: CONNECT followed by RST_STREAM started an upstream connect each, without limit.
    Now at most MAX_PENDING_OPENS run per connection, and a reset storm closes it."""
    held = []
    base = hbone.ServerConnection._open_one

    async def slow(self, st):  # upstream connects that take a while, counted
        held.append(self.pending)
        await asyncio.sleep(0.5)
        await base(self, st)

    hbone.ServerConnection._open_one = slow
    try:
        s = server.client()
        c = _h2_client()
        s.sendall(c.data_to_send())
        before = _refused(server)
        sid, opened = 1, 0
        try:
            for _ in range(3000):
                c.send_headers(sid, [(":method", "CONNECT"),
                                     (":authority", f"127.0.0.1:{server.echo_port}")])  # fmt: skip
                c.reset_stream(sid)
                sid += 2
                opened += 1
                if opened % 100 == 0:
                    s.sendall(c.data_to_send())
            s.sendall(c.data_to_send())
        except (OSError, ssl.SSLError):
            pass  # closed on us: the storm was noticed
        got = _drain(s, 3)
        after = _refused(server)
    finally:
        hbone.ServerConnection._open_one = base
    assert max(held) <= hbone.MAX_PENDING_OPENS, max(held)
    assert after.get("pending_opens", 0) > before.get("pending_opens", 0)
    assert after.get("reset_storm", 0) == before.get("reset_storm", 0) + 1
    assert b"\x00\x00\x00\x0b" in got  # a GOAWAY with ENHANCE_YOUR_CALM (0xb) was sent
    assert b"ping" in _good_flow(server)
