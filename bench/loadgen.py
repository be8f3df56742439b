"""An open-loop HTTP/1.1 load generator: requests at a fixed rate, latency from the intended send time.

    python -m bench.loadgen --url http://IP:PORT/ --rate 1000 --conns 16 --duration 10

Request i is due at start + i/rate whether or not earlier ones have
answered (open loop). It goes out on an idle keep-alive connection, or
waits for one; its latency counts from when it was due, so a stall shows
up in every request it delays (no coordinated omission, like wrk2 and
fortio). Prints one JSON document: counts, errors, percentiles and 1,000
quantiles for a CDF.

No request leaves before its due time: the event loop's timers fire up to a
millisecond early (uvloop), which made 29% of some runs' latencies negative
and every latency ratio biased. So the generator sleeps until SPIN before
the due time, then waits on the clock itself; a request whose send still
comes early, or a latency below zero, makes the run fail (exit 2) instead of
reporting figures. ``--self-test MS`` serves answers after a known delay on
loopback and checks that the generator reports that delay, never less.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.parse

SPIN = 0.002  # seconds before a due time when the timer hands over to the clock


class InvalidRun(Exception):
    """The run measured something impossible (an early send, a negative latency)."""


async def until(due: float) -> None:
    """Return at due (time.perf_counter), never before: sleep short of it, then watch the
    clock, yielding to the loop meanwhile."""
    delay = due - time.perf_counter() - SPIN
    if delay > 0:
        await asyncio.sleep(delay)
    while time.perf_counter() < due:
        await asyncio.sleep(0)


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


def target(url: str) -> tuple[str, int, bytes]:
    """(host, port, the request) of an http:// URL; its port is 80 when it names none."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"--url {url!r}: http://HOST[:PORT]/PATH (plain HTTP/1.1)")
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    req = f"GET {path} HTTP/1.1\r\nHost: {u.hostname}\r\n\r\n".encode()
    return u.hostname, u.port or 80, req


async def run(url: str, rate: float, conns: int, duration: float, warmup: float) -> dict:
    host, port, req = target(url)
    idle: asyncio.Queue = asyncio.Queue()
    for _ in range(conns):
        idle.put_nowait(await asyncio.open_connection(host, port))
    lat: list[float] = []
    errors = early = 0

    async def one(due: float, record: bool) -> None:
        nonlocal errors, early
        r, w = await idle.get()
        try:
            if time.perf_counter() < due:
                early += 1  # cannot happen after until(): counted, and the run fails
            await _request(r, w, req)
            if record:
                lat.append(time.perf_counter() - due)
            idle.put_nowait((r, w))
        except (OSError, ValueError, asyncio.IncompleteReadError):
            errors += 1
            w.close()
            try:
                idle.put_nowait(await asyncio.open_connection(host, port))
            except OSError:
                pass

    tasks = []
    start = time.perf_counter() + 0.05
    total = int(rate * (warmup + duration))
    skip = int(rate * warmup)
    for i in range(total):
        due = start + i / rate
        await until(due)
        tasks.append(asyncio.ensure_future(one(due, i >= skip)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start - warmup
    lat.sort()
    n = len(lat)
    if early or (n and lat[0] < 0):
        raise InvalidRun(
            f"{early} requests left before their due time, lowest latency "
            f"{lat[0] * 1e3 if n else 0:.3f} ms: the figures would be biased"
        )

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
        "min_ms": lat[0] * 1e3 if n else float("nan"),
        "quantiles_ms": [q(i / 1000) for i in range(1000)],
    }


async def _delayed_server(delay: float) -> asyncio.Server:
    """HTTP/1.1 on 127.0.0.1 that answers every request after delay seconds (on the clock,
    never before), 1 KiB of body."""
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n" + b"x" * 1024

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                await r.readuntil(b"\r\n\r\n")
                await until(time.perf_counter() + delay)
                w.write(resp)
        except (asyncio.IncompleteReadError, ConnectionError):
            w.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def self_test(delay: float, rate: float, duration: float) -> dict:
    """Run against a server that answers after a known delay: the figures must show it."""
    srv = await _delayed_server(delay)
    port = srv.sockets[0].getsockname()[1]
    try:
        res = await run(f"http://127.0.0.1:{port}/", rate, 16, duration, 0.5)
    finally:
        srv.close()
    res["known_delay_ms"] = delay * 1e3
    res["resolution_ms"] = res["p50_ms"] - delay * 1e3  # what the path adds on loopback
    if res["min_ms"] < delay * 1e3:
        raise InvalidRun(f"a latency of {res['min_ms']:.3f} ms against a {delay * 1e3} ms delay")
    return res


def _loop_run(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url")
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=1)
    ap.add_argument("--self-test", type=float, metavar="MS", help="against a server that "
                    "answers after MS milliseconds, on loopback")  # fmt: skip
    a = ap.parse_args()
    try:
        if a.self_test is not None:
            res = _loop_run(self_test(a.self_test / 1e3, a.rate, a.duration))
        elif a.url:
            res = _loop_run(run(a.url, a.rate, a.conns, a.duration, a.warmup))
        else:
            ap.error("--url or --self-test")
    except InvalidRun as e:
        print(f"error: invalid run: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
