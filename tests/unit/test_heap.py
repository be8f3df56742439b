"""agent/heap.py: the C heap's free pages go back to the system.

Real glibc, in a fresh interpreter (its heap untouched by other tests): once a large mapped
block is freed, glibc serves later large blocks from its heap and keeps them when they are
freed (what bulk load left in a tunnel: 60-92 MiB where it had started with 35). A trim gives
them back."""

import json
import os
import subprocess
import sys

CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from agent import heap

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

big = bytes(8 << 20)  # mapped on its own; freeing it raises glibc's mmap threshold
del big
blocks = [bytearray(1 << 20) for _ in range(96)]  # now from the heap, every page touched
keep = bytearray(300_000)  # from the top, last: the top is not free, nothing trims itself
del blocks
held = rss()
if sys.argv[2] == "off":
    heap._trim = lambda pad: 0  # what a process without the trimmer keeps
t = heap.Trimmer(every=0.05)
early = t.maybe()
time.sleep(0.06)
trimmed = t.maybe()
after = rss()
again = t.maybe()
print(json.dumps({"held": held, "after": after, "early": early, "trimmed": trimmed,
                  "again": again, "trims": t.trims, "keep": len(keep)}))
"""


def _run(mode: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run(
        [sys.executable, "-c", CHILD, root, mode], capture_output=True, text=True, check=True
    )
    return json.loads(r.stdout)


def test_a_trim_gives_back_what_the_heap_kept_and_at_most_every_period():
    got = _run("on")
    assert (got["early"], got["trimmed"], got["again"], got["trims"]) == (False, True, False, 1)
    assert got["held"] - got["after"] > 64, got  # most of the 96 MiB went back
    kept = _run("off")  # the same without a trim: the heap keeps it
    assert kept["held"] - kept["after"] < 8, kept
