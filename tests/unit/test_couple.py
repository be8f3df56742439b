"""The tunnel's user-space relay for connections the kernel splice refuses (tunnel._couple)."""

import asyncio
import socket

from agent.ztunnel import hbone
from agent.ztunnel.tunnel import _couple


def test_relay_carries_both_ways_and_closes_both_after_both_half_close():
    async def go():
        loop = asyncio.get_running_loop()
        base = hbone.TcpSide.open
        a_in, a_out = socket.socketpair()  # a_out: the client's end
        b_in, b_out = socket.socketpair()  # b_out: the server's end
        _, a = await loop.connect_accepted_socket(hbone.TcpSide, a_in)
        _, b = await loop.connect_accepted_socket(hbone.TcpSide, b_in)
        _couple(a, b)
        cr, cw = await asyncio.open_connection(sock=a_out)
        sr, sw = await asyncio.open_connection(sock=b_out)
        cw.write(b"request")
        cw.write_eof()  # the client half-closes first
        assert await sr.read() == b"request"
        sw.write(b"response")
        sw.write_eof()
        assert await cr.read() == b"response"
        for _ in range(50):
            if hbone.TcpSide.open == base:
                break
            await asyncio.sleep(0.02)
        return hbone.TcpSide.open - base

    assert asyncio.run(go()) == 0  # both relay sides closed: nothing left in CLOSE-WAIT
