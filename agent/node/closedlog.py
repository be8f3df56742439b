"""closed.jsonl: the agent's durable log of the last closed flows (the kernel's records).

It always ends with the last ``keep`` records, in order: new ones are appended, and the file
is rewritten from memory only when it would pass twice that, or when more arrived than are
kept (rewriting all of it every second cost a tenth of a core under connection churn).
"""

from __future__ import annotations

import collections
import itertools
import os

from ..bpf.flows import FlowRecord


class ClosedLog:
    """The last keep closed records in memory, and their file in state_dir."""

    def __init__(self, state_dir: str, keep: int):
        self.path = os.path.join(state_dir, "closed.jsonl")
        self.records: collections.deque[FlowRecord] = collections.deque(maxlen=max(keep, 1))
        self._new = 0  # records added since the file was last written
        self._lines = -1  # lines in the file; -1: rewrite it

    def __len__(self) -> int:
        return len(self.records)

    def add(self, recs: list[FlowRecord]) -> None:
        self.records.extend(recs)
        self._new += len(recs)

    def write(self) -> None:
        """The new ones are the last of records: no second list of them (under churn a
        second's worth of records, tens of thousands, held for this write alone)."""
        new, self._new = self._new, 0
        keep = self.records.maxlen
        if self._lines >= 0 and new <= keep and self._lines + new <= 2 * keep:
            if new:
                recent = itertools.islice(self.records, len(self.records) - new, None)
                with open(self.path, "a") as f:
                    f.writelines(r.json_line() for r in recent)
                self._lines += new
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(r.json_line() for r in self.records)
        os.replace(tmp, self.path)
        self._lines = len(self.records)
