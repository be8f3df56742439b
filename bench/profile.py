"""Where the mesh's time goes: py-spy profiles of both nodes' tunnels and agents under load.

    python -m bench.profile [--duration 10] [--out DIR]

One lab (2 nodes, 2 meshed pods each), then for each load, run from n1-p1
to n2-p2 across nodes: ``connrate`` (wrk, 64 connections, a new connection
per request), ``bulk`` (iperf3, one stream) and ``latency`` (bench/loadgen.py,
1,000 rps on 16 connections), py-spy samples the source tunnel (n1) and the
destination tunnel (n2) at 100 Hz. Writes the collapsed stacks
(``<load>-<node>.txt``, for flame graphs) and ``profile.md``: per load and
tunnel, the share of busy samples spent in each function (self) and under it
(inclusive).
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time

from agent.lab import apps, mesh
from agent.lab import lab as labmod
from agent.lab.spec import ClusterSpec, PodSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pyspy() -> str:
    return os.path.join(os.path.dirname(sys.executable), "py-spy")


# Leaf frames that are waiting, not working: py-spy --nonblocking cannot always tell
IDLE = ("EpollSelector.select (selectors.py)", "RingBuffer.poll (ringbuf.py)")


def summarize(path: str, top: int = 12) -> tuple[int, list, list]:
    """(busy samples, [(self %, function)], [(inclusive %, function)]) of collapsed stacks.

    Samples whose leaf is a wait (IDLE) are left out; the inclusive list leaves out the
    frames on (nearly) every stack (the entry point down to the event loop).
    """
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not n.isdigit():
                continue
            n = int(n)
            frames = [_short(x) for x in stack.split(";")]
            if frames[-1] in IDLE:
                continue
            total += n
            own[frames[-1]] += n
            for fr in set(frames):
                incl[fr] += n
    trunk = {k for k, v in incl.items() if v >= 0.8 * total}
    for k in trunk:
        del incl[k]
    pct = lambda c: [(100 * v / max(total, 1), k) for k, v in c.most_common(top)]  # noqa: E731
    return total, pct(own), pct(incl)


def _short(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({os.path.basename(file)})" if file else name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    name = f"bp{os.getpid() % 10000}"
    pods = [PodSpec(name=f"n{i}-p{j}", node=f"n{i}") for i in (1, 2) for j in (1, 2)]
    L = labmod.up(name, ClusterSpec(2, pods))
    procs = []
    work = tempfile.mkdtemp(prefix="dabba-profile-")
    report = ["# Where the tunnel's time goes (py-spy, 100 Hz, busy samples only)", ""]
    try:
        procs += list(mesh.up(L, capture=True).values())
        srv = L.pod("n2-p2")
        procs.append(apps.start_nginx(L, srv.name, 8080, os.path.join(work, srv.name)))
        procs.append(L.popen(srv.name, ["iperf3", "-s", "-B", srv.ip, "-p", "5501"],
                             stdout=subprocess.DEVNULL))  # fmt: skip
        time.sleep(1)
        st = {n: mesh.agent_status(L, n) for n in ("n1", "n2")}
        tunnels = {f"{n}-tunnel": st[n]["tunnel"]["pid"] for n in st}
        tunnels.update({f"{n}-agent": st[n]["pid"] for n in st})
        d = a.duration
        loads = {
            "connrate": ["wrk", "-t", "2", "-c", "64", "-d", f"{d + 2}s", "-H",
                         "Connection: close", f"http://{srv.ip}:8080/"],
            "bulk": ["iperf3", "-c", srv.ip, "-p", "5501", "-t", str(d + 2)],
            "latency": [sys.executable, "-m", "bench.loadgen", "--url", f"http://{srv.ip}:8080/",
                        "--rate", "1000", "--conns", "16", "--duration", str(d + 1)],
        }  # fmt: skip
        for load, argv_ in loads.items():
            cmd, pre = L.command("n1-p1", argv_)
            client = subprocess.Popen(cmd, preexec_fn=pre, cwd=ROOT, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(1)
            spies = {
                n: subprocess.Popen(
                    [
                        pyspy(),
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        str(d),
                        "--rate",
                        "100",
                        "--format",
                        "raw",
                        "--nonblocking",
                        "--output",
                        os.path.join(a.out, f"{load}-{n}.txt"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
                for n, pid in tunnels.items()
            }
            for s in spies.values():
                s.wait(d + 60)
            client.wait(d + 60)
            for n in tunnels:
                role = "source" if n.startswith("n1") else "destination"
                total, own, incl = summarize(os.path.join(a.out, f"{load}-{n}.txt"))
                report += [
                    f"## {load}: {role} node's {n.split('-')[1]} ({n.split('-')[0]}), {total} busy samples in {d} s "
                    f"({total / d:.0f}% of a core)",
                    "",
                    "| self % | function | | inclusive % | function |",
                    "|---|---|---|---|---|",
                ]
                for (sp, sf), (ip_, if_) in zip(own, incl, strict=False):
                    report.append(f"| {sp:.1f} | `{sf}` | | {ip_:.1f} | `{if_}` |")
                report.append("")
            print(f"profiled {load}", flush=True)
    finally:
        for p in procs:
            p.kill()
        labmod.down(name, quiet=True)
    with open(os.path.join(a.out, "profile.md"), "w") as f:
        f.write("\n".join(report) + "\n")
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
