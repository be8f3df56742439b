"""An open-loop HTTP/1.1 load generator: requests at a fixed rate, latency from the intended send time.

    python -m bench.loadgen --url http://IP:PORT/ --rate 1000 --conns 16 --duration 10

Request i is due at start + i/rate whether or not earlier ones have
answered (open loop). It goes out on an idle keep-alive connection, or
waits for one; its latency counts from when it was due, so a stall shows
up in every request it delays (no coordinated omission, like wrk2 and
fortio). Prints one JSON document: counts, errors, percentiles and 1,000
quantiles for a CDF.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.parse


async def _request(r: asyncio.StreamReader, w: asyncio.StreamWriter, req: bytes) -> None:
    w.write(req)
    head = await r.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ValueError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await r.readexactly(length)


async def run(url: str, rate: float, conns: int, duration: float, warmup: float) -> dict:
    u = urllib.parse.urlsplit(url)
    req = f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.hostname}\r\n\r\n".encode()
    idle: asyncio.Queue = asyncio.Queue()
    for _ in range(conns):
        idle.put_nowait(await asyncio.open_connection(u.hostname, u.port))
    lat: list[float] = []
    errors = 0

    async def one(due: float, record: bool) -> None:
        nonlocal errors
        r, w = await idle.get()
        try:
            await _request(r, w, req)
            if record:
                lat.append(time.perf_counter() - due)
            idle.put_nowait((r, w))
        except (OSError, ValueError, asyncio.IncompleteReadError):
            errors += 1
            w.close()
            try:
                idle.put_nowait(await asyncio.open_connection(u.hostname, u.port))
            except OSError:
                pass

    tasks = []
    start = time.perf_counter() + 0.05
    total = int(rate * (warmup + duration))
    skip = int(rate * warmup)
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due, i >= skip)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start - warmup
    lat.sort()
    n = len(lat)

    def q(p: float) -> float:
        return lat[min(n - 1, int(p * n))] * 1e3 if n else float("nan")

    return {
        "requests": n,
        "errors": errors,
        "rate": rate,
        "achieved_rps": n / elapsed if elapsed > 0 else 0.0,
        "conns": conns,
        "p50_ms": q(0.5),
        "p90_ms": q(0.9),
        "p99_ms": q(0.99),
        "p999_ms": q(0.999),
        "max_ms": lat[-1] * 1e3 if n else float("nan"),
        "quantiles_ms": [q(i / 1000) for i in range(1000)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=1)
    a = ap.parse_args()
    try:
        import uvloop

        res = uvloop.run(run(a.url, a.rate, a.conns, a.duration, a.warmup))
    except ImportError:
        res = asyncio.run(run(a.url, a.rate, a.conns, a.duration, a.warmup))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
