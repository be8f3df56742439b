"""closed.jsonl, the agent's durable log of closed flows: it always ends with the last
keep_closed records, in order, whether they came a few at a time (appended) or in a burst larger
than keep_closed (the file rewritten from memory)."""

import json
import time

from agent.bpf.flows import FlowRecord
from agent.node.closedlog import ClosedLog


def _rec(i: int) -> FlowRecord:
    now = time.time()
    return FlowRecord(i, 7, "outbound", ("10.0.0.1", 40000 + i % 20000), ("10.0.0.2", 80),
                      ("10.0.0.2", 80), False, i, 2 * i, 1, 1, 0, 50, now - 1, now, "fin",
                      "CLOSE")  # fmt: skip


def test_closed_log_ends_with_the_last_records_through_appends_and_bursts(tmp_path):
    keep = 50
    log = ClosedLog(str(tmp_path), keep)
    n = 0
    for batch in (3, 10, 0, 40, 49, 51, 200, 1, 7, 60, 2):  # bursts above keep, and small ones
        recs = [_rec(n + i) for i in range(batch)]
        n += batch
        log.add(recs)
        log.write()
        lines = (tmp_path / "closed.jsonl").read_text().splitlines()
        got = [json.loads(line)["cookie"] for line in lines]
        want = list(range(max(0, n - keep), n))
        assert got[-len(want) :] == want, (batch, got[-5:])
        assert len(got) <= 2 * keep and got == sorted(set(got))  # bounded, no line twice
        assert len(log) == len(want)
        if not recs:
            continue
        assert json.loads(lines[-1]) == json.loads(json.dumps(recs[-1].as_dict())) | {
            "duration": json.loads(lines[-1])["duration"]
        }


def test_a_log_cut_under_the_agent_starts_again_with_the_new_records(tmp_path):
    log = ClosedLog(str(tmp_path), 10)
    log.add([_rec(i) for i in range(15)])
    log.write()
    log.add([_rec(i) for i in range(15, 20)])
    log.write()  # appended: 15 lines
    (tmp_path / "closed.jsonl").write_text("")  # an operator truncates it
    log.add([_rec(i) for i in range(20, 27)])  # 22 > 2 * 10: rewritten from its tail
    log.write()
    got = [json.loads(x)["cookie"] for x in (tmp_path / "closed.jsonl").read_text().splitlines()]
    assert got == list(range(20, 27))
    log.add([_rec(27)])
    log.write()
    got = [json.loads(x)["cookie"] for x in (tmp_path / "closed.jsonl").read_text().splitlines()]
    assert got == list(range(20, 28))
