"""The log's burst limiter: a flood writes a few lines and a count, and the count is not lost."""

from __future__ import annotations

import asyncio
import logging

from agent import log


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _logger():
    h = _Lines()
    base = logging.getLogger("dabba.test-burst")
    base.handlers[:] = [h]
    base.propagate = False
    base.setLevel(logging.INFO)
    return log.get("test-burst"), h


def test_the_count_of_the_last_burst_is_written_when_its_second_ends():
    # the failure CI saw: 10,000 refusals inside one second and none after; the count
    # was only written when a later event came, so it never was
    logger, h = _logger()
    seen = {"n": 0}

    async def main():
        b = log.Burst(logger, "things refused", first=5, window=0.3, fields=lambda: dict(seen))
        for i in range(20):
            seen["n"] = i + 1
            b.warning("thing refused", fields={"i": i})
        assert h.lines == [f"thing refused i={i}" for i in range(5)]
        await asyncio.sleep(0.5)  # no event after the burst

    asyncio.run(main())
    assert h.lines[5:] == ["15 more things refused in the last second n=20"]


def test_each_second_starts_with_full_lines_again_and_close_flushes():
    logger, h = _logger()

    async def main():
        b = log.Burst(logger, "things refused", first=2, window=0.2)
        for i in range(4):
            b.warning(f"a{i}")
        await asyncio.sleep(0.3)
        for i in range(3):
            b.warning(f"b{i}")
        b.flush()  # closing writes what is held at once
        assert b.held == 0
        await asyncio.sleep(0.3)  # and the cancelled timer writes nothing more

    asyncio.run(main())
    assert h.lines == [
        "a0",
        "a1",
        "2 more things refused in the last second",
        "b0",
        "b1",
        "1 more things refused in the last second",
    ]
