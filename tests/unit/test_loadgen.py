"""bench/loadgen.py measures what it says: no request leaves before its due time, a known delay
is reported as that delay and never less, and a run that saw the impossible fails."""

import asyncio
import json
import subprocess
import sys

import pytest

from bench import loadgen


def test_a_known_delay_is_reported_never_less():
    r = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--self-test", "2", "--rate", "400",
         "--duration", "1.5"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["errors"] == 0 and d["requests"] == 600
    # every latency is at least the server's delay: none was counted from a late start
    assert d["min_ms"] >= 2.0 and d["p50_ms"] >= 2.0
    print(f"\nloadgen self-test: 2 ms delay reported as p50 {d['p50_ms']:.3f} ms")


def test_a_request_sent_before_its_due_time_fails_the_run(monkeypatch):
    """Before: the loop's timers fired up to a millisecond early and the requests went with
    them; 29% of a run's latencies came out negative and were reported as figures."""

    async def early(due: float) -> None:  # what asyncio.sleep(due - now) did on uvloop
        await asyncio.sleep(max(0.0, due - loadgen.time.perf_counter() - 0.001))

    monkeypatch.setattr(loadgen, "until", early)
    with pytest.raises(loadgen.InvalidRun, match="requests left before their due time"):
        asyncio.run(loadgen.self_test(0.002, 400, 0.5))


def test_a_url_without_a_port_is_port_80_and_a_wrong_scheme_is_refused():
    """Before: a URL without a port connected to port 0."""
    assert loadgen.target("http://10.96.0.60/") == (
        "10.96.0.60", 80, b"GET / HTTP/1.1\r\nHost: 10.96.0.60\r\n\r\n")  # fmt: skip
    assert loadgen.target("http://10.0.0.1:8080/x?y=1") == (
        "10.0.0.1", 8080, b"GET /x?y=1 HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n")  # fmt: skip
    with pytest.raises(ValueError, match="http://HOST"):
        loadgen.target("https://10.0.0.1/")
