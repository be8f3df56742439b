"""Compile, load and pin programs, in a process of their own.

    python -m agent.bpf.compile JSON

JSON: {"cflags": [...], "programs": [{"source", "function", "prog_type",
"expected_attach", "pin", "optional"}, ...]}. bcc maps LLVM into the process
that compiles (about 175 MiB resident here); doing it in one short-lived child
keeps the long-running agent small. The child pins each loaded program and
exits, printing {"seconds": {function: compile-and-load seconds}, "failed":
{function: why}} as JSON; the parent opens the pins. "failed" holds only
optional programs (those a kernel may lack: the BPF LSM); any other failure
prints one line naming the program to stderr and exits 1, having pinned
nothing for that program.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    try:
        from bcc import BPF
    except ImportError as e:
        print(f"bcc is not importable ({e}); install python3-bpfcc (make setup)", file=sys.stderr)
        return 1
    from .sys import obj_pin

    seconds = {}
    failed = {}
    compiled = {}  # source -> BPF: a file with several programs is compiled once
    try:
        for p in job["programs"]:
            t0 = time.monotonic()
            try:
                b = compiled.get(p["source"])
                if b is None:
                    b = compiled[p["source"]] = BPF(
                        src_file=p["source"].encode(), cflags=job["cflags"]
                    )
                fn = b.load_func(
                    p["function"].encode(),
                    int(p["prog_type"]),
                    attach_type=int(p["expected_attach"]),
                )
                obj_pin(fn.fd, p["pin"])
                seconds[p["function"]] = time.monotonic() - t0
            except Exception as e:  # bcc raises bare Exception
                msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
                if p.get("optional"):
                    failed[p["function"]] = msg
                    continue
                print(f"{p['function']}: {msg}", file=sys.stderr)
                return 1
    finally:
        for b in compiled.values():
            b.cleanup()
    print(json.dumps({"seconds": seconds, "failed": failed}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
