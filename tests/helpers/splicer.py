"""Accept one connection, connect to a target, splice both (agent/ztunnel/splice.py).

Runs in a node's netns like the tunnel would. Prints JSON lines: when it
paired the sockets, and at the end how the pair closed and how many bytes
this process read (rchar from /proc/self/io) while the sockets were paired.
"""

import argparse
import json
import socket
import sys
import time

sys.path.insert(0, sys.argv[sys.argv.index("--repo") + 1])

from agent.ztunnel.splice import Splicer  # noqa: E402


def rchar():
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo")
    ap.add_argument("--listen", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--delay", type=float, default=0.0, help="wait before pairing")
    a = ap.parse_args()
    sp = Splicer()
    host, port = a.listen.rsplit(":", 1)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, int(port)))
    ls.listen(4)
    print(json.dumps({"listening": a.listen}), flush=True)
    down, _ = ls.accept()
    th, tp = a.target.rsplit(":", 1)
    up = socket.create_connection((th, int(tp)))
    time.sleep(a.delay)
    before = rchar()
    pair = sp.pair(down, up)
    print(json.dumps({"paired": True}), flush=True)
    sp.run(until=lambda: pair.closed, tick=0.05)
    read = rchar() - before
    done = {
        "closed": pair.reason,
        "rchar_while_paired": read,
        "moved": sp.stats.get("splice_bytes", 0),
    }
    print(json.dumps(done), flush=True)


if __name__ == "__main__":
    main()
