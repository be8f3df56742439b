"""What a tunnel replays to a new agent line: the facts of every open flow, however many short
flows came and went since, and those of flows closed in the last GRACE seconds."""

import collections
import json

from agent.ztunnel import facts as factsmod
from agent.ztunnel.facts import FactsSender


def _send(f: FactsSender, key: str, live: bool = True) -> None:
    f.send(key, "source", {"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}, live=live, path="hbone")


def _replayed(f: FactsSender) -> list[str]:
    return [json.loads(line)["key"] for line in f.replay()]


def test_an_open_flows_fact_outlives_any_churn_and_closed_ones_go_after_the_grace(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(factsmod.time, "monotonic", lambda: now[0])
    f = FactsSender("/nonexistent", collections.Counter())
    _send(f, "long")  # a flow that stays open
    for i in range(50_000):  # churn: more short flows than any count kept before (16,384)
        _send(f, f"short-{i}")
        f.closed(f"short-{i}")
        now[0] += 0.0001  # 5 s in all
    _send(f, "refused", live=False)  # ended where it was sent
    got = _replayed(f)
    assert got[0] == "long"
    assert "refused" in got and "short-49999" in got
    assert len(got) <= 1 + FactsSender.RECENT_MAX + 1  # closed ones bounded
    now[0] += FactsSender.GRACE + 0.1
    assert _replayed(f) == ["long"]
    f.closed("long")
    assert _replayed(f) == ["long"]  # within its grace
    now[0] += FactsSender.GRACE + 0.1
    assert _replayed(f) == []
    f.closed(None, "never-sent")  # a socket gone before its fact: nothing to end
    assert not f.kept and f.stats["facts_unkept"] == 0


def test_a_flow_that_ends_in_a_refusal_leaves_no_open_fact():
    f = FactsSender("/nonexistent", collections.Counter())
    _send(f, "k")  # a connection under way
    _send(f, "k", live=False)  # then refused: its last word
    assert "k" not in f.kept and json.loads(f.replay()[0])["key"] == "k"


def test_a_bursts_closed_facts_are_let_go_without_another_close(monkeypatch):
    """The tunnel's loop calls expire(): what a burst left is freed GRACE seconds on, not when
    the next flow closes (after 2,000 connections/s, 4,096 lines of ~700 bytes stayed)."""
    now = [1000.0]
    monkeypatch.setattr(factsmod.time, "monotonic", lambda: now[0])
    f = FactsSender("/nonexistent", collections.Counter())
    for i in range(FactsSender.RECENT_MAX):
        _send(f, f"short-{i}")
        f.closed(f"short-{i}")
    _send(f, "open")
    f.expire()
    assert len(f.recent) == FactsSender.RECENT_MAX  # within their grace: kept
    now[0] += FactsSender.GRACE + 0.1
    f.expire()
    assert len(f.recent) == 0 and _replayed(f) == ["open"]
    assert list(f.kept) == ["open"]  # an open flow's fact is never expired
