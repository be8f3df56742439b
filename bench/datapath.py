"""Datapath costs on this machine: load time, capture cost per connection, agent memory.

    python -m bench.datapath [--connections 3000] [--rounds 4] [--out DIR]

All figures come from one run in one lab. The connect-rate modes run
interleaved (A B C A B C ...) so machine noise hits them alike:

- ``direct``: a pod that is not enrolled connects to the listener;
- ``account``: the pod is enrolled for accounting only (sock_create, sockops);
- ``capture``: the pod is enrolled with capture: it connects to a remote
  pod's address and connect4 rewrites it to the same listener, so the
  kernel path is the same length and the difference is our programs.

The client measures the wall time of connect()+close() per connection;
the listener accepts and closes in a loop on the node.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

from agent.bpf import abi
from agent.bpf.control import DatapathControl
from agent.bpf.loader import Datapath
from agent.lab import lab as labmod
from agent.lab import spec

CLIENT = r"""
import socket, struct, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
linger0 = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT, no port exhaustion
t, c = time.perf_counter(), time.process_time()
for _ in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
    s.connect((host, port))
    s.close()
print((time.perf_counter() - t) / n * 1e6, (time.process_time() - c) / n * 1e6)
"""

SERVER = r"""
import socket, sys
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2]))); ls.listen(4096)
print("ready", flush=True)
while True:
    c, _ = ls.accept(); c.close()
"""


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def agent_run(lab, node, cfg_path, state_dir):
    """Start an agent, wait until its datapath is ready; return (proc, status, rss KiB)."""
    p = lab.popen(
        node,
        [sys.executable, "-m", "agent.cli", "agent", "run", "--config", cfg_path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    path = os.path.join(state_dir, "status.json")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                st = json.load(f)
            if st["pid"] == p.pid:
                time.sleep(1.0)  # settled
                return p, st, rss_kib(p.pid)
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    p.kill()
    raise RuntimeError("agent did not start")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    name = f"bd{os.getpid() % 100000}"
    L = labmod.up(name, spec.default_spec(2, 2))
    results: dict = {
        "machine": {
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    procs = []
    try:
        n1 = L.node("n1")
        tmp = tempfile.mkdtemp()
        cfg = labmod.agent_config(L, "n1")
        cfg["workloads"] = []  # enrolment below is per mode
        cfg_path = os.path.join(tmp, "n1.yaml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(cfg, f)

        # 1. load time (fresh) and adoption (restart), agent memory in both cases
        p, st, rss_loaded = agent_run(L, "n1", cfg_path, cfg["state_dir"])
        results["load"] = {r["program"]: round(r["seconds"], 3) for r in st["load"]}
        results["load_total_s"] = round(sum(r["seconds"] for r in st["load"]), 3)
        p.send_signal(signal.SIGTERM)
        p.wait(10)
        p, st, rss_adopted = agent_run(L, "n1", cfg_path, cfg["state_dir"])
        results["adopt_total_s"] = round(sum(r["seconds"] for r in st["load"]), 4)
        results["agent_rss_mib"] = {
            "after_loading": round(rss_loaded / 1024, 1),
            "after_adopting": round(rss_adopted / 1024, 1),
        }
        procs.append(p)

        # 2. connect cost per mode, interleaved
        ctl = DatapathControl(Datapath(n1.bpf_node, n1.cgroup))
        srv = L.popen(
            "n1",
            [sys.executable, "-c", SERVER, n1.gateway, "15001"],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(srv)
        srv.stdout.readline()
        client = L.pod("n1-p1")
        remote = L.pod("n2-p1").ip
        modes = {
            "direct": (0, n1.gateway),
            "account": (abi.WL_ACCOUNT, n1.gateway),
            "capture": (abi.WL_ACCOUNT | abi.WL_CAPTURE, remote),
        }
        per: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(a.rounds):
            for m, (flags, dst) in modes.items():
                if flags:
                    ctl.enrol(client.cgroup, 1, flags)
                else:
                    ctl.unenrol(client.cgroup)
                r = L.run(
                    client.name, [sys.executable, "-c", CLIENT, dst, "15001", str(a.connections)]
                )
                wall, cpu_us = map(float, r.stdout.split())
                per[m].append(wall)
                cpu[m].append(cpu_us)
        ctl.unenrol(client.cgroup)
        base = statistics.median(per["direct"])
        results["connect_us"] = {
            m: {
                "min": round(min(v), 2),
                "median": round(statistics.median(v), 2),
                "max": round(max(v), 2),
                "added_over_direct_us": round(statistics.median(v) - base, 2),
                "ratio_to_direct": round(statistics.median(v) / base, 3),
            }
            for m, v in per.items()
        }
        results["connect_rate_per_s"] = {
            m: round(1e6 / statistics.median(v)) for m, v in per.items()
        }
        cbase = statistics.median(cpu["direct"])
        results["connect_cpu_us"] = {
            m: {
                "median": round(statistics.median(v), 2),
                "min": round(min(v), 2),
                "max": round(max(v), 2),
                "added_over_direct_us": round(statistics.median(v) - cbase, 2),
                "ratio_to_direct": round(statistics.median(v) / cbase, 3),
            }
            for m, v in cpu.items()
        }
        results["params"] = {"connections": a.connections, "rounds": a.rounds}
    finally:
        for p in procs:
            p.kill()
        labmod.down(name, quiet=True)

    out = a.out or os.path.join(
        os.path.dirname(__file__),
        "results",
        datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-datapath",
    )
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = [
        f"# Datapath costs ({results['when']}, {results['machine']['cores']} cores, kernel "
        f"{results['machine']['kernel']})",
        "",
        f"Program load (compile with bcc + verify + pin + attach): {results['load_total_s']} s for 5 programs "
        f"({', '.join(f'{k} {v} s' for k, v in results['load'].items())}); adopting them after a restart: "
        f"{results['adopt_total_s']} s.",
        "",
        f"Agent RSS: {results['agent_rss_mib']['after_loading']} MiB after loading, "
        f"{results['agent_rss_mib']['after_adopting']} MiB after adopting.",
        "",
        f"connect()+close() from a pod to a listener on its node, {a.connections} connections x {a.rounds} "
        "rounds, modes interleaved:",
        "",
        "| mode | median us | min | max | added over direct (us) | ratio | connections/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m, v in results["connect_us"].items():
        lines.append(
            f"| {m} | {v['median']} | {v['min']} | {v['max']} | {v['added_over_direct_us']} | "
            f"{v['ratio_to_direct']} | {results['connect_rate_per_s'][m]} |"
        )
    lines += [
        "",
        "Client CPU time (user+system, which includes our programs: they run in the connecting",
        "process's syscalls) per connection, same runs:",
        "",
        "| mode | median us | min | max | added over direct (us) | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m, v in results["connect_cpu_us"].items():
        lines.append(
            f"| {m} | {v['median']} | {v['min']} | {v['max']} | {v['added_over_direct_us']} | "
            f"{v['ratio_to_direct']} |"
        )
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
