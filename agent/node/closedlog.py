"""closed.jsonl: the agent's durable log of the last closed flows (the kernel's records).

It always ends with the last ``keep`` records, in order: new ones are appended, and when the
file would pass twice that (or more arrived than are kept) it is rewritten to the last
``keep`` lines: its own tail, copied by the kernel (copy_file_range), and the new ones. The
file is the log's memory: the agent holds no record, only where each line ends. Ten thousand
held records (and a second's worth under churn, as many again, waiting for their write) grew
the agent by 10 MiB under load, which it never gave back; rewriting all of it every second
cost a tenth of a core under connection churn.
"""

from __future__ import annotations

import itertools
import os
from array import array

from ..bpf.flows import FlowRecord


class ClosedLog:
    """The file of the last keep closed records in state_dir. Records are written as they are
    added, through a buffer flushed by write(): none is held (a second of records under churn
    was ten thousand decoded records alive at once, whose memory the agent never gave back)."""

    def __init__(self, state_dir: str, keep: int):
        self.path = os.path.join(state_dir, "closed.jsonl")
        self.keep = max(keep, 1)
        self._file = None  # open for appending once the file was started afresh
        self._ends = array("Q")  # where each line of the file ends

    def __len__(self) -> int:
        return min(len(self._ends), self.keep)

    def add(self, recs: list[FlowRecord]) -> None:
        keep, ends = self.keep, self._ends
        if len(recs) > keep:
            recs = recs[-keep:]
        if self._file is not None and len(ends) + len(recs) <= 2 * keep:
            self._append(self._file, recs, ends[-1] if ends else 0, ends)
            return
        # started afresh, or twice keep: the file's last lines and the new ones
        if self._file is not None:
            self._file.close()
            self._file = None
        tmp = self.path + ".tmp"
        kept = array("Q")
        with open(tmp, "w") as f:
            at = 0
            need = keep - len(recs)
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
            self._append(f, recs, at, kept)
        os.replace(tmp, self.path)
        self._ends = kept
        self._file = open(self.path, "a")  # noqa: SIM115 (kept open: the agent's log)

    def write(self) -> None:
        """Flush what was added (the agent calls it every second); start the file if no record
        came yet."""
        if self._file is None:
            self.add([])
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @staticmethod
    def _append(f, recs, at: int, ends: array) -> None:
        """Write recs' lines at offset at (JSON lines are ASCII: a character is a byte) and
        note where each ends."""
        for r in recs:
            line = r.json_line()
            f.write(line)
            at += len(line)
            ends.append(at)


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
