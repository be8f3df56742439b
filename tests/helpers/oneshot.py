"""N connections of one HTTP request each, C at a time, run inside a lab pod.

  oneshot.py IP PORT N C

Each connection sends one GET with Connection: close and reads the answer to EOF. Prints one
JSON line: how many connections answered 200, how many failed (and the first errors), and the
connections per second.
"""

import asyncio
import json
import resource
import sys
import time


async def main(ip: str, port: int, n: int, c: int) -> dict:
    req = f"GET / HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode()
    left, ok, errors = n, 0, []

    async def one() -> None:
        nonlocal ok
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(ip, port), 30)
            w.write(req)
            answer = await asyncio.wait_for(r.read(), 30)  # to EOF: the server closes
            w.close()
            if answer.startswith(b"HTTP/1.1 200 "):
                ok += 1
            else:
                errors.append(answer[:40].decode(errors="replace"))
        except (OSError, TimeoutError) as e:
            errors.append(f"{type(e).__name__}: {e}")

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    t = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(c)))
    secs = time.monotonic() - t
    return {"ok": ok, "failed": len(errors), "errors": errors[:5], "conns_per_s": n / secs}


if __name__ == "__main__":
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ip, port, n, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(asyncio.run(main(ip, port, n, c))), flush=True)
