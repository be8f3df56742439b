"""closed.jsonl: the agent's durable log of the last closed flows (the kernel's records).

It always ends with the last ``keep`` records, in order: every second the new ones are
appended, and when the file would pass twice that (or more arrived than are kept) it is
rewritten to the last ``keep`` lines: its own tail, copied by the kernel (copy_file_range), and
the new ones. The file is the log's memory: the agent holds no decoded record, only where each
line ends and, until the next write, the new records' bytes. Ten thousand held records (and a
second's worth under churn, as many again, waiting for their write) grew the agent by 10 MiB
under load, which it never gave back; rewriting all of it every second cost a tenth of a core
under connection churn.
"""

from __future__ import annotations

import collections
import itertools
import os
from array import array

from ..bpf.flows import _FLOW, FlowRecord


class ClosedLog:
    """The file of the last keep closed records in state_dir, and the records added since its
    last write, as the kernel's bytes (one buffer a batch: no object a record)."""

    CHUNK = 500  # records decoded at a time when written

    def __init__(self, state_dir: str, keep: int):
        self.path = os.path.join(state_dir, "closed.jsonl")
        self.keep = max(keep, 1)
        self._file = None  # open for appending once the file was started afresh
        self._ends = array("Q")  # where each line of the file ends
        # since the last write: (the records' bytes joined, how many, their wall offset); at
        # most keep records (under churn more come in a second than are kept: the file would
        # keep only the last anyway, and decoding and writing the others cost a tenth of a core)
        self._batches: collections.deque[tuple[bytes, int, float]] = collections.deque()
        self._held = 0
        self._new = 0  # records added since the last write (more than held when dropped)

    def __len__(self) -> int:
        return min(len(self._ends) + self._held, self.keep)

    def add(self, recs: list[FlowRecord], raws: list[bytes] | None = None, wall: float = 0.0):
        """recs, with the kernel's bytes of each and their wall offset (made from recs when not
        given: records built in Python)."""
        if raws is None:
            raws, wall = [r.to_raw() for r in recs], 0.0
        if not raws:
            return
        self._batches.append((b"".join(raws), len(raws), wall))
        self._held += len(raws)
        self._new += len(raws)
        while self._held - self._batches[0][1] >= self.keep:  # whole batches past keep
            self._held -= self._batches.popleft()[1]

    def write(self) -> None:
        """Write what was added (the agent calls it every second); start the file afresh the
        first time."""
        new, self._new = self._new, 0
        batches, self._batches, held, self._held = self._batches, collections.deque(), self._held, 0
        skip = max(held - self.keep, 0)  # the oldest held ones are past keep
        keep, ends = self.keep, self._ends
        count = min(new, keep)
        if self._file is not None and new <= keep and len(ends) + count <= 2 * keep:
            self._append(self._file, batches, skip, ends[-1] if ends else 0, ends)
            self._file.flush()
            return
        # started afresh, or twice keep: the file's last lines and the new ones
        if self._file is not None:
            self._file.close()
            self._file = None
        tmp = self.path + ".tmp"
        kept = array("Q")
        with open(tmp, "w") as f:
            at = 0
            need = keep - count
            if ends and need > 0:
                first = max(len(ends) - need, 0)
                start = ends[first - 1] if first else 0
                at = _copy_tail(self.path, f, start, ends[-1] - start)
                if at == ends[-1] - start:
                    kept.extend(e - start for e in itertools.islice(ends, first, None))
                else:  # the file was cut or removed under us: the new lines alone
                    f.seek(0)
                    f.truncate()
                    at = 0
            self._append(f, batches, skip, at, kept)
        os.replace(tmp, self.path)
        self._ends = kept
        self._file = open(self.path, "a")  # noqa: SIM115 (kept open: the agent's log)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _append(self, f, batches, skip: int, at: int, ends: array) -> None:
        """Write the held records after the first skip at offset at (JSON lines are ASCII: a
        character is a byte), decoded a chunk at a time, and note where each line ends."""
        size = _FLOW.size
        for blob, n, wall in batches:
            for lo in range(0, n, self.CHUNK):
                hi = min(lo + self.CHUNK, n)
                if skip >= hi - lo:
                    skip -= hi - lo
                    continue
                lines = [FlowRecord.from_raw(blob[i * size : (i + 1) * size], wall).json_line()
                         for i in range(lo + skip, hi)]  # fmt: skip
                skip = 0
                f.writelines(lines)
                ends.extend(itertools.accumulate(map(len, lines), initial=at))
                del ends[len(ends) - len(lines) - 1]  # accumulate's initial value
                at = ends[-1]


def _copy_tail(path: str, f, start: int, count: int) -> int:
    """Copy count bytes of path from start into f (the kernel copies them); returns how many
    it copied (fewer when path was cut or removed)."""
    f.flush()
    try:
        src = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        done = 0
        while done < count:
            n = os.copy_file_range(src, f.fileno(), count - done, start + done)
            if n == 0:  # the file is shorter than we thought (truncated under us)
                break
            done += n
        return done
    finally:
        os.close(src)
