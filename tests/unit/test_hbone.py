"""HBONE on loopback: real TLS 1.3 + HTTP/2 CONNECT, identities from a real CA, real sockets."""

import asyncio
import hashlib
import os
import socket

import pytest

from agent.control import ca as camod
from agent.ztunnel import hbone, inbound, listeners, tls

TD = "cluster.local"
CLIENT = camod.spiffe_id(TD, "front", "sleep")
SERVER = camod.spiffe_id(TD, "shop", "web")
OTHER = camod.spiffe_id(TD, "shop", "db")


def _issue(ca, d, ident):
    key = camod.new_key()
    issued = ca.issue(camod.make_csr(key, ident), ident)
    base = os.path.join(d, ident.split("/")[-1])
    with open(base + ".chain.pem", "wb") as f:
        f.write(issued.chain_pem)
    with open(base + ".key.pem", "wb") as f:
        f.write(camod.key_pem(key))
    return base + ".chain.pem", base + ".key.pem"


@pytest.fixture
def pki(tmp_path):
    ca = camod.CA.load_or_create(str(tmp_path / "ca"), TD)
    files = {i: _issue(ca, str(tmp_path), i) for i in (CLIENT, SERVER, OTHER)}
    return ca, files, tmp_path


async def _echo_server():
    async def handle(r, w):
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.write_eof()
        await w.drain()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def _setup(ca, files, decide=None):
    echo, echo_port = await _echo_server()
    ids = tls.ServerIdentities(TD, ca.bundle_pem())
    ids.set(SERVER, *files[SERVER])
    seen = []

    async def on_connect(authority, client_id, client_ip):
        seen.append((authority, client_id))
        if decide and (why := decide(authority, client_id)):
            return why
        host, port = authority.rsplit(":", 1)
        return await hbone.dial_tcp(host, int(port))

    srv = inbound.serve(listeners.bind(("127.0.0.1", 0), "HBONE"), ids, on_connect)
    port = srv.sockets[0].getsockname()[1]
    pool = hbone.Pool(TD, ca.bundle_pem(), lambda ident: files[ident])
    return echo, echo_port, ids, srv, port, pool, seen


async def _flow(pool, port, echo_port, dst=SERVER, src=CLIENT):
    """A local socket whose bytes go through HBONE to the echo server; returns asyncio streams on it."""
    conn = await pool.get(src, dst, ("127.0.0.1", port))
    stream = await conn.connect(f"127.0.0.1:{echo_port}")
    a, b = socket.socketpair()
    loop = asyncio.get_running_loop()
    _, side = await loop.connect_accepted_socket(hbone.TcpSide, a)
    side.attach(stream)
    r, w = await asyncio.open_connection(sock=b)
    return r, w, stream


async def _roundtrip(r, w, n):
    payload = os.urandom(n)

    async def send():
        for i in range(0, n, 1 << 20):
            w.write(payload[i : i + (1 << 20)])
            await w.drain()
        w.write_eof()

    t = asyncio.ensure_future(send())
    got = bytearray()
    while chunk := await r.read(1 << 20):
        got += chunk
    await t
    return hashlib.sha256(payload).hexdigest(), hashlib.sha256(got).hexdigest(), len(got)


def test_flows_are_multiplexed_on_one_handshake_and_bytes_survive(pki):
    ca, files, _ = pki

    async def go():
        echo, echo_port, _, srv, port, pool, seen = await _setup(ca, files)
        r1, w1, s1 = await _flow(pool, port, echo_port)
        r2, w2, s2 = await _flow(pool, port, echo_port)
        res = await asyncio.gather(_roundtrip(r1, w1, 10_000_000), _roundtrip(r2, w2, 3_000_000))
        srv.close()
        echo.close()
        return res, pool.handshakes, seen, s1.stream_id, s2.stream_id

    res, handshakes, seen, id1, id2 = asyncio.run(go())
    (h1, g1, n1), (h2_, g2, n2) = res
    assert (n1, n2) == (10_000_000, 3_000_000) and h1 == g1 and h2_ == g2
    assert handshakes == 1 and id1 != id2  # two streams, one TLS connection
    assert all(client == CLIENT for _, client in seen)


def test_peer_must_prove_the_destination_identity(pki):
    ca, files, _ = pki

    async def go():
        echo, echo_port, ids, srv, port, pool, _ = await _setup(ca, files)
        ids.contexts[OTHER] = ids.contexts[
            SERVER
        ]  # a server answering for db with web's certificate
        try:
            with pytest.raises(hbone.HboneError, match=f"proved {SERVER}, not {OTHER}: refused"):
                await pool.get(CLIENT, OTHER, ("127.0.0.1", port))
        finally:
            srv.close()
            echo.close()

    asyncio.run(go())


def test_unknown_destination_identity_fails_the_handshake(pki):
    ca, files, _ = pki

    async def go():
        echo, echo_port, ids, srv, port, pool, _ = await _setup(ca, files)
        try:
            with pytest.raises(hbone.HboneError, match="TLS to 127.0.0.1"):
                await pool.get(CLIENT, OTHER, ("127.0.0.1", port))
        finally:
            srv.close()
            echo.close()

    asyncio.run(go())


def test_client_certificate_from_another_ca_is_refused(pki):
    ca, files, tmp = pki
    other_ca = camod.CA.load_or_create(str(tmp / "other"), TD)
    rogue = _issue(other_ca, str(tmp / "other"), CLIENT)

    async def go():
        echo, echo_port, _, srv, port, _, seen = await _setup(ca, files)
        pool = hbone.Pool(TD, ca.bundle_pem(), lambda ident: rogue)
        try:
            with pytest.raises((hbone.HboneError, ConnectionError, asyncio.TimeoutError)):
                conn = await pool.get(CLIENT, SERVER, ("127.0.0.1", port))
                await conn.connect(f"127.0.0.1:{echo_port}", timeout=3)
            assert seen == []
        finally:
            srv.close()
            echo.close()

    asyncio.run(go())


def test_policy_refusal_is_reported_and_the_connection_stays_usable(pki):
    ca, files, _ = pki

    def decide(authority, client):
        if authority.endswith(":2"):  # a reason that is not one line: sent as one
            return "denied: internal error: line one\r\nline two"
        return "denied by DENY policy shop/d rule 0" if authority.endswith(":1") else None

    async def go():
        echo, echo_port, _, srv, port, pool, _ = await _setup(ca, files, decide=decide)
        try:
            conn = await pool.get(CLIENT, SERVER, ("127.0.0.1", port))
            with pytest.raises(
                hbone.HboneError, match="refused with 403: denied by DENY policy shop/d rule 0"
            ):
                await conn.connect("127.0.0.1:1")
            with pytest.raises(
                hbone.HboneError,
                match="refused with 403: denied: internal error: line one  line two",
            ):
                await conn.connect("127.0.0.1:2")
            r, w, _ = await _flow(pool, port, echo_port)  # same pooled connection, another flow
            return await _roundtrip(r, w, 50_000), pool.handshakes
        finally:
            srv.close()
            echo.close()

    (h, g, n), handshakes = asyncio.run(go())
    assert n == 50_000 and h == g and handshakes == 1


def test_garbage_after_handshake_closes_that_connection_only(pki):
    ca, files, _ = pki

    async def go():
        echo, echo_port, _, srv, port, pool, _ = await _setup(ca, files)
        ctx = tls.client_context(*files[CLIENT], ca.bundle_pem())
        r, w = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=tls.sni_for(SERVER)
        )
        # preface, empty SETTINGS, then DATA on stream 0: a connection error (RFC 9113 §6.1)
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        data_on_0 = b"\x00\x00\x05\x00\x00\x00\x00\x00\x00hello"
        w.write(preface + settings + data_on_0)
        await w.drain()
        closed = await asyncio.wait_for(r.read(), 5)  # the server answers GOAWAY and closes
        r1, w1, _ = await _flow(pool, port, echo_port)
        ok = await _roundtrip(r1, w1, 100_000)
        srv.close()
        echo.close()
        return closed, ok

    closed, (h, g, n) = asyncio.run(go())
    assert n == 100_000 and h == g


def test_a_server_that_speaks_first_and_closes_loses_nothing(pki):
    """Bytes and the end of stream that arrive before the flow's TCP side is attached are kept."""
    ca, files, _ = pki

    async def go():
        echo, _, _, srv, port, pool, _ = await _setup(ca, files)

        async def greet(r, w):
            w.write(b"220 hello from a server-first protocol\r\n")
            await w.drain()
            w.close()

        greeter = await asyncio.start_server(greet, "127.0.0.1", 0)
        gport = greeter.sockets[0].getsockname()[1]
        conn = await pool.get(CLIENT, SERVER, ("127.0.0.1", port))
        stream = await conn.connect(f"127.0.0.1:{gport}")
        await asyncio.sleep(0.3)  # the greeting and the end arrive before we attach
        assert stream.early and stream.early_end
        a, b = socket.socketpair()
        _, side = await asyncio.get_running_loop().connect_accepted_socket(hbone.TcpSide, a)
        side.attach(stream)
        r, _ = await asyncio.open_connection(sock=b)
        got = await asyncio.wait_for(r.read(), 5)
        for s in (srv, echo, greeter):
            s.close()
        return got

    assert asyncio.run(go()) == b"220 hello from a server-first protocol\r\n"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_response_after_a_large_half_closed_upload_is_delivered_whole(pki, loop):
    """The client uploads 10 MB and half-closes; the server answers only after reading it all.

    The upload waits for HBONE window after the client's FIN, so reading was paused and
    resumed after EOF, and the transport reported EOF a second time (seen with uvloop in
    the lab). That second EOF sent a second END_STREAM, a protocol error that closed the
    client's connection before the answer came: 0 bytes back. Here the second EOF is
    reported explicitly, after the first END_STREAM went out and before the answer.
    """
    ca, files, _ = pki
    answer = 123_456

    async def go():
        echo, _, _, srv, port, pool, _ = await _setup(ca, files)
        got_request = []

        async def sink(r, w):
            n = 0
            while chunk := await r.read(1 << 20):
                n += len(chunk)
            got_request.append(n)
            await asyncio.sleep(0.2)  # the second EOF comes in this gap
            w.write(b"x" * answer)
            await w.drain()
            w.close()

        server = await asyncio.start_server(sink, "127.0.0.1", 0)
        sport = server.sockets[0].getsockname()[1]
        results = []
        for _ in range(3):
            conn = await pool.get(CLIENT, SERVER, ("127.0.0.1", port))
            stream = await conn.connect(f"127.0.0.1:{sport}")
            a, b = socket.socketpair()
            _, side = await asyncio.get_running_loop().connect_accepted_socket(hbone.TcpSide, a)
            side.attach(stream)
            r, w = await asyncio.open_connection(sock=b)
            w.write(b"y" * 10_000_000)
            w.write_eof()
            for _ in range(2000):
                if side.eof and stream.ended and not stream.end_pending:
                    break
                await asyncio.sleep(0.005)
            assert side.eof and not stream.end_pending, "the upload did not finish"
            side.eof_received()  # what a transport resumed after its EOF reports
            results.append(len(await asyncio.wait_for(r.read(), 20)))
            w.close()
        for s in (srv, echo, server):
            s.close()
        return results, got_request

    if loop == "uvloop":
        import uvloop

        results, got_request = uvloop.run(go())
    else:
        results, got_request = asyncio.run(go())
    assert got_request == [10_000_000] * 3
    assert results == [answer] * 3


def test_a_pooled_connection_is_replaced_when_it_is_old_or_its_certificate_renewed(pki):
    """Before: a pooled connection carried new flows for as long as it lived, with the client
    certificate it was made with, past that certificate's renewal (and a revocation)."""
    ca, files, tmp = pki

    async def go():
        echo, echo_port, _, srv, port, pool, _seen = await _setup(ca, files)
        pool.max_age = 0.3
        r1, w1, s1 = await _flow(pool, port, echo_port)
        first = pool.conns[(CLIENT, SERVER, f"127.0.0.1:{port}")]
        same = await pool.get(CLIENT, SERVER, ("127.0.0.1", port))
        await asyncio.sleep(0.4)  # older than max_age: the next flow gets a new connection
        r2, w2, s2 = await _flow(pool, port, echo_port)
        second = pool.conns[(CLIENT, SERVER, f"127.0.0.1:{port}")]
        # the old one still carries its flow, whole, then closes
        old_flow = await _roundtrip(r1, w1, 100_000)
        await asyncio.sleep(1.5)
        first_closed = first.transport.is_closing()
        # a renewed certificate (new file) replaces the connection at once
        pool.max_age = 3600
        _issue(ca, str(tmp), CLIENT)
        os.utime(files[CLIENT][0], ns=(1, 1))  # a stamp the pool has not seen
        r3, w3, s3 = await _flow(pool, port, echo_port)
        third = pool.conns[(CLIENT, SERVER, f"127.0.0.1:{port}")]
        res = await _roundtrip(r3, w3, 10_000)
        for w in (w2, w3):
            w.close()
        srv.close()
        echo.close()
        return same is first, second is not first, old_flow, first_closed, third is not second, \
            res, pool.retired, pool.handshakes  # fmt: skip

    same, replaced, old_flow, first_closed, renewed, res, retired, handshakes = asyncio.run(go())
    assert same and replaced and renewed
    assert old_flow[0] == old_flow[1] and old_flow[2] == 100_000  # its flow was not cut
    assert first_closed
    assert res[2] == 10_000 and retired == 2 and handshakes == 3


def test_signed_by_any_tells_a_retired_roots_leaf(pki, tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    ca, files, _ = pki
    other = camod.CA.load_or_create(str(tmp_path / "other"), TD)
    with open(files[CLIENT][0], "rb") as f:
        der = x509.load_pem_x509_certificate(f.read()).public_bytes(Encoding.DER)
    assert tls.signed_by_any(der, ca.bundle_pem())
    assert not tls.signed_by_any(der, other.bundle_pem())
    assert not tls.signed_by_any(None, ca.bundle_pem())


def test_certificates_of_a_revoked_node_are_refused_both_ways(pki):
    """The serials a snapshot lists (Snapshot.revoked_serials): a client holding one is refused
    at the handshake and counted; a pool does not keep a server holding one."""
    from cryptography import x509

    ca, files, _ = pki

    def serial(ident):
        with open(files[ident][0], "rb") as f:
            return format(x509.load_pem_x509_certificate(f.read()).serial_number, "x")

    async def go():
        echo, echo_port = await _echo_server()
        ids = tls.ServerIdentities(TD, ca.bundle_pem())
        ids.set(SERVER, *files[SERVER])
        revoked = {serial(CLIENT)}

        async def on_connect(authority, client_id, client_ip):
            host, port = authority.rsplit(":", 1)
            return await hbone.dial_tcp(host, int(port))

        srv = inbound.serve(listeners.bind(("127.0.0.1", 0), "HBONE"), ids, on_connect,
                          revoked=lambda s: s in revoked)  # fmt: skip
        port = srv.sockets[0].getsockname()[1]
        pool = hbone.Pool(TD, ca.bundle_pem(), lambda ident: files[ident])
        refused_client = None
        try:
            conn = await pool.get(CLIENT, SERVER, ("127.0.0.1", port))
            await conn.connect(f"127.0.0.1:{echo_port}", timeout=3)
        except hbone.HboneError as e:
            refused_client = str(e)
        await asyncio.sleep(0.2)
        counted = dict(srv.refused)
        # the other way: a pool told the server's serial is revoked drops it after the handshake
        revoked.clear()
        pool2 = hbone.Pool(TD, ca.bundle_pem(), lambda ident: files[ident],
                           revoked=lambda s: s == serial(SERVER))  # fmt: skip
        refused_server = None
        try:
            await pool2.get(CLIENT, SERVER, ("127.0.0.1", port))
        except hbone.HboneError as e:
            refused_server = str(e)
        ok = await (await pool.get(CLIENT, SERVER, ("127.0.0.1", port))).connect(
            f"127.0.0.1:{echo_port}", timeout=3
        )
        srv.close()
        echo.close()
        return refused_client, counted, refused_server, ok

    refused_client, counted, refused_server, ok = asyncio.run(go())
    assert refused_client is not None and counted == {"revoked": 1}, (refused_client, counted)
    assert "revoked node's certificate" in refused_server
    assert ok is not None  # lifted: the same client gets through


def test_the_forwarded_client_address_of_both_families_round_trips():
    from agent.ztunnel.hbone import _forwarded_for, forwarded

    for addr in ("10.20.1.11", "fd00:20:1::b"):
        assert _forwarded_for(forwarded(addr)) == addr
    assert forwarded("fd00:20:1::b") == 'for="[fd00:20:1::b]"'  # RFC 7239 §6: quoted, bracketed
    for bad in ("for=fd00::1", "for=web", 'for="[10.0.0.1]"', "by=10.0.0.1", "for=_hidden"):
        assert _forwarded_for(bad) is None, bad


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_peer_that_stops_reading_holds_the_sender_to_its_high_water_mark(pki, loop):
    """Before: a sender pushed a connection's whole flow-control window (16 MiB) into its TLS
    transport when the peer stopped reading, and its buffers stayed that large. Now the
    streams' DATA waits (their TCP sides paused) once HBONE_HIGH_WATER is unsent, and every
    byte still arrives, in order, when the peer reads again."""
    ca, files, _ = pki

    async def go():
        echo, echo_port, ids, srv, port, pool, seen = await _setup(ca, files)
        r, w, stream = await _flow(pool, port, echo_port)
        (server_conn,) = list(srv.conns)
        client_conn = stream.conn
        # small kernel buffers between the two, so that what the sender took in is what it
        # holds itself, give or take 1 MiB
        for c, opt in ((client_conn, socket.SO_SNDBUF), (server_conn, socket.SO_RCVBUF)):
            c.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, opt, 65536)
        server_conn.transport.pause_reading()  # the peer stops reading
        payload = os.urandom(24 << 20)
        w.write(payload)  # the local writer's own buffer holds what the mesh refuses
        await asyncio.sleep(1.5)
        unsent = client_conn.transport.get_write_buffer_size()
        paused, held, taken = client_conn.write_paused, len(stream.outbuf), stream.bytes_out
        server_conn.transport.resume_reading()
        w.write_eof()
        got = bytearray()
        while chunk := await r.read(1 << 20):
            got += chunk
        w.close()
        srv.close()
        echo.close()
        sums = hashlib.sha256(got).digest(), hashlib.sha256(payload).digest()
        return unsent, paused, held, taken, *sums

    run = __import__("uvloop").run if loop == "uvloop" else asyncio.run
    unsent, paused, held, taken, got, want = run(go())
    assert paused  # the transport asked, and the connection waits
    # what the sender took in (16 MiB, the whole window, before): its high-water mark, a
    # frame, what the small kernel buffers hold; and it holds one TCP read besides
    assert taken <= hbone.HBONE_HIGH_WATER + hbone.MAX_FRAME + (1 << 20), taken
    assert unsent <= hbone.HBONE_HIGH_WATER + hbone.MAX_FRAME, unsent
    assert held <= 1 << 20, held
    assert got == want  # and nothing was lost when the peer read again


def test_a_flow_on_a_connection_lost_before_it_got_there_fails_at_once(pki):
    """TLS 1.3: a server that refuses our certificate closes right after our handshake ended,
    and the close could be read before the flow sent its CONNECT on that connection. Before, the
    CONNECT was never sent and the flow waited for its timeout (an Envoy lab test saw the flow
    pending); now it fails at once, as retryable, and the pool makes a new connection."""
    ca, files, _ = pki

    async def go():
        echo, echo_port, _, srv, port, pool, _ = await _setup(ca, files)
        try:
            conn = await pool.get(CLIENT, SERVER, ("127.0.0.1", port))
            conn.transport.abort()
            await asyncio.sleep(0.05)  # the loss is read first
            with pytest.raises(hbone.HboneError, match="the connection is closed") as e:
                await conn.connect(f"127.0.0.1:{echo_port}", timeout=3)
            again = await pool.get(CLIENT, SERVER, ("127.0.0.1", port))
            return e.value.refused_stream, again is not conn, pool.handshakes
        finally:
            srv.close()
            echo.close()

    assert asyncio.run(go()) == (True, True, 2)


def test_a_flow_that_ends_while_backed_up_gives_the_pooled_connection_its_window_back(pki):
    """Before: a flow whose local reader stopped (its TCP side paused, the stream's DATA left
    unacknowledged, up to the whole 16 MiB window) and that then ended kept that share of the
    connection's window for good: the next flow on the pooled connection stalled (a
    benchmark's second iperf3 run hung so). Now the connection gets it back, and the next
    flow carries 32 MiB both ways."""
    ca, files, _ = pki

    async def go():
        echo, echo_port, ids, srv, port, pool, seen = await _setup(ca, files)
        r, w, stream = await _flow(pool, port, echo_port)
        conn = stream.conn
        w.write(os.urandom(24 << 20))  # echoed back to a reader that never reads
        await asyncio.sleep(2)
        held = stream.unacked
        w.transport.abort()  # the workload resets its connection
        await asyncio.sleep(0.5)
        window = conn.h2.conn_recv_win + conn.h2.conn_consumed
        r2, w2, stream2 = await _flow(pool, port, echo_port)
        assert stream2.conn is conn  # the same pooled connection
        got = await asyncio.wait_for(_roundtrip(r2, w2, 32 << 20), 30)
        w2.close()
        srv.close()
        echo.close()
        return held, window, got

    held, window, (sent, got, n) = asyncio.run(go())
    assert held > 4 << 20, held  # the flow did end holding window (beyond a TCP side's buffer)
    assert window == hbone.WINDOW  # all of it came back
    assert sent == got and n == 32 << 20
