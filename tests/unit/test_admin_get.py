"""agent/ztunnel/admin.py's GET, the mesh's one client of local HTTP servers (the agent reads the
tunnel's admin, the tunnel the agent's, a waypoint's supervisor Envoy's admin, which streams
some answers chunked): a real server on loopback answering as each does, or as none should."""

import asyncio

import pytest

from agent.ztunnel import admin

ANSWERS = {
    "length": b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"a": [1]}\n',
    "chunked": (
        b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4\r\n{"a"\r\n7;ext=1\r\n: [1]}\n\r\n0\r\n\r\n'
    ),  # fmt: skip
}


async def _serve(answer: bytes):
    async def handle(r, w):
        await r.readuntil(b"\r\n\r\n")
        w.write(answer)
        await w.drain()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


@pytest.mark.parametrize(("kind", "status"), [("length", 200), ("chunked", 503)])
def test_a_body_is_read_whole_with_its_status(kind, status):
    async def go():
        srv, port = await _serve(ANSWERS[kind])
        try:
            return await admin.get("127.0.0.1", port, "/x", timeout=5)
        finally:
            srv.close()

    assert asyncio.run(go()) == (status, b'{"a": [1]}\n')


@pytest.mark.parametrize(
    "answer",
    [b"", b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nx"],
)
def test_what_is_not_an_http_answer_is_a_value_error(answer):
    """Callers take ValueError (with OSError and TimeoutError) as "did not answer"."""

    async def go():
        srv, port = await _serve(answer)
        try:
            with pytest.raises(ValueError):
                await admin.get("127.0.0.1", port, "/x", timeout=5)
        finally:
            srv.close()

    asyncio.run(go())
