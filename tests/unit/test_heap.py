"""agent/heap.py: the C heap's free pages go back to the system.

Real glibc in this process: once a large mapped block is freed, glibc serves later large
blocks from its heap and keeps them when they are freed (what bulk load left in a tunnel:
60-92 MiB where it had started with 35). A trim gives them back."""

import time

from agent import heap


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_trim_gives_back_what_the_heap_kept_and_at_most_every_period():
    big = bytes(8 << 20)  # mapped on its own; freeing it raises glibc's mmap threshold
    del big
    blocks = [bytearray(1 << 20) for _ in range(96)]  # now from the heap, every page touched
    keep = bytearray(300_000)  # from the top, last: the top is not free, nothing trims itself
    del blocks
    held = _rss_mib()
    t = heap.Trimmer(every=0.05)
    assert t.maybe() is False  # not before its period
    time.sleep(0.06)
    assert t.maybe() is True and t.trims == 1
    assert held - _rss_mib() > 64, (held, _rss_mib())  # most of the 96 MiB went back
    assert t.maybe() is False  # and not again within the period
    assert keep is not None
