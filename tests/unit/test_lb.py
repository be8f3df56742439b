"""Endpoint picking and outlier ejection (agent/ztunnel/lb.py), with a controlled clock."""

from agent.ztunnel.lb import Balancer, LbConfig

EPS = ["a", "b", "c"]


def _balancer(**kw):
    b = Balancer(LbConfig(**kw))
    now = [1000.0]
    b.clock = lambda: now[0]
    return b, now


def test_round_robin_goes_in_turn_and_skips_excluded():
    b, _ = _balancer()
    assert [b.pick("s", "round_robin", EPS) for _ in range(6)] == EPS * 2
    assert b.pick("s", "round_robin", EPS, exclude=["a", "b"]) == "c"
    assert b.pick("s", "round_robin", EPS, exclude=EPS) is None


def test_least_connections_prefers_the_least_loaded():
    b, _ = _balancer()
    b.opened("a")
    b.opened("a")
    b.opened("b")
    assert b.pick("s", "least_connections", EPS) == "c"
    b.opened("c")
    assert b.pick("s", "least_connections", EPS) in {"b", "c"}
    b.closed("a")
    b.closed("a")
    assert b.pick("s", "least_connections", EPS) == "a"


def test_ejection_after_consecutive_failures_with_backoff_and_expiry():
    b, now = _balancer(eject_after=3, eject_time=10)
    for _ in range(2):
        b.failed("s", "a", EPS)
    assert not b.ejected("a")
    b.failed("s", "a", EPS)
    assert b.ejected("a") and b.snapshot()["ejected"] == {"a": 10.0}
    assert {b.pick("s", "round_robin", EPS) for _ in range(10)} == {"b", "c"}
    now[0] += 10.1
    assert not b.ejected("a")
    for _ in range(3):
        b.failed("s", "a", EPS)
    assert b.snapshot()["ejected"] == {"a": 20.0}  # doubled on the second ejection
    assert b.stats["ejections"] == 2 and b.stats["connect_failures"] == 6


def test_a_success_resets_the_failure_count():
    b, _ = _balancer(eject_after=3)
    b.failed("s", "a", EPS)
    b.failed("s", "a", EPS)
    b.opened("a")
    b.failed("s", "a", EPS)
    assert not b.ejected("a")


def test_never_more_than_the_maximum_share_is_ejected():
    b, _ = _balancer(eject_after=1, max_ejected=0.5)
    b.failed("s", "a", EPS)
    b.failed("s", "b", EPS)  # a second ejection would be 2 of 3 > 50%
    assert b.ejected("a") and not b.ejected("b")
    one, _ = _balancer(eject_after=1)
    one.failed("s", "a", ["a"])
    assert not one.ejected("a")  # a lone endpoint is never ejected


def test_all_ejected_still_tries_them():
    b, _ = _balancer(eject_after=1, max_ejected=1.0)
    for e in EPS:
        b.failed("s", e, EPS)
    assert all(b.ejected(e) for e in EPS)
    assert b.pick("s", "random", EPS) in EPS
