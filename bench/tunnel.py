"""The tunnel against no mesh, in one lab, one run: latency, throughput, CPU, connection rate.

    python -m bench.tunnel [--rounds 3] [--duration 5] [--out DIR]

Four pods per node: p1 and p2 are in the mesh (captured, tunnelled), p3 and
p4 are left out of the registry, so they talk directly over the same veths,
bridge and kernel. Every scenario runs both modes back to back, round after
round (A B A B), so machine noise hits both alike:

- ``latency``: wrk, 16 connections, 1 KiB responses from nginx, --latency
  percentiles (closed loop: wrk's latency, not coordinated-omission free;
  the fixed-rate harness is the benchmark issue's);
- ``rps``: wrk, 256 connections: requests per second;
- ``connrate``: wrk with ``Connection: close``: a new connection per request;
- ``bulk``: iperf3, 1 stream: receiver Gbit/s;
- cross-node and same-node pairs for each.
CPU: the tunnels' user+system time during each mesh run, per 1,000 requests
(or per GiB for bulk). The report states machine, kernel and versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

from agent.lab import apps, mesh
from agent.lab import lab as labmod
from agent.lab.spec import ClusterSpec, PodSpec
from agent.ztunnel.workers import cpu_seconds
from bench.datapath import rss_kib

PAIRS = {  # scenario pair -> (mesh client, mesh server, plain client, plain server)
    "cross-node": ("n1-p1", "n2-p2", "n1-p3", "n2-p4"),
    "same-node": ("n1-p1", "n1-p2", "n1-p3", "n1-p4"),
}


def _tunnel_pids(L) -> list[int]:
    return [mesh.agent_status(L, node)["tunnel"]["pid"] for node in ("n1", "n2")]


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def wrk(L, client, ip, conns, duration, close=False) -> dict:
    argv = [
        "wrk",
        "-t",
        "2",
        "-c",
        str(conns),
        "-d",
        f"{duration}s",
        "--latency",
        "--timeout",
        "10s",
    ]
    if close:
        argv += ["-H", "Connection: close"]
    out = L.run(client, [*argv, f"http://{ip}:8080/"], timeout=duration + 60).stdout
    res = {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "errors": sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out)),
    }
    for p in ("50", "90", "99"):
        res[f"p{p}_ms"] = _ms(re.search(rf"\s{p}%\s+(\S+)", out).group(1))
    return res


def iperf(L, client, ip, duration) -> dict:
    r = L.run(
        client, ["iperf3", "-c", ip, "-p", "5501", "-t", str(duration), "-J"], timeout=duration + 60
    )
    end = json.loads(r.stdout)["end"]
    return {
        "gbps": end["sum_received"]["bits_per_second"] / 1e9,
        "bytes": end["sum_received"]["bytes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench.tunnel: run as root (it builds a lab)")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or os.path.join(os.path.dirname(__file__), "results", f"{stamp}-tunnel")
    os.makedirs(out_dir, exist_ok=True)
    name = f"bt{os.getpid() % 10000}"
    pods = [PodSpec(name=f"n{i}-p{j}", node=f"n{i}") for i in (1, 2) for j in (1, 2, 3, 4)]
    L = labmod.up(name, ClusterSpec(2, pods))
    procs = []
    work = tempfile.mkdtemp(prefix="dabba-bench-")
    try:
        procs += list(mesh.up(L, capture=True).values())
        reg = os.path.join(mesh.paths(L)["registry"], "lab.yaml")
        with open(reg) as f:
            docs = [
                d for d in yaml.safe_load_all(f) if not d["metadata"]["name"].endswith(("p3", "p4"))
            ]
        with open(reg, "w") as f:
            yaml.safe_dump_all(docs, f, sort_keys=False)  # p3, p4 leave the mesh: no mesh
        time.sleep(3)
        for pod in ("n1-p2", "n2-p2", "n1-p4", "n2-p4"):
            procs.append(apps.start_nginx(L, pod, 8080, os.path.join(work, pod)))
            procs.append(
                L.popen(pod, ["iperf3", "-s", "-B", L.pod(pod).ip, "-p", "5501"],
                        stdout=subprocess.DEVNULL)
            )  # fmt: skip
        time.sleep(1)
        tunnels = _tunnel_pids(L)
        results: dict = {}
        for rnd in range(args.rounds):
            for pair, (mc, ms, pc, ps) in PAIRS.items():
                for scen in ("latency", "rps", "connrate", "bulk"):
                    for mode in ("none", "dabba"):
                        c, s = (pc, ps) if mode == "none" else (mc, ms)
                        ip = L.pod(s).ip
                        cpu0 = sum(cpu_seconds(p) for p in tunnels)
                        if scen == "bulk":
                            r = iperf(L, c, ip, args.duration)
                        else:
                            conns = {"latency": 16, "rps": 256, "connrate": 64}[scen]
                            r = wrk(L, c, ip, conns, args.duration, close=scen == "connrate")
                        cpu = sum(cpu_seconds(p) for p in tunnels) - cpu0
                        if mode == "dabba":
                            r["tunnel_cpu_s"] = cpu
                            r["tunnel_cores"] = cpu / args.duration
                            if "requests" in r:
                                r["tunnel_cpu_ms_per_1k"] = (
                                    cpu * 1000 / max(1, r["requests"]) * 1000
                                )
                        results.setdefault(f"{pair}/{scen}/{mode}", []).append(r)
                        print(f"round {rnd + 1} {pair:10} {scen:8} {mode:5} {r}", flush=True)
        rss = {
            f"tunnel_{n}_rss_mib": rss_kib(p) / 1024
            for n, p in zip(("n1", "n2"), tunnels, strict=True)
        }
        summary = {k: _summ(v) for k, v in results.items()}
        doc = {
            "machine": {
                "cores": os.cpu_count(),
                "kernel": platform.release(),
                "python": platform.python_version(),
                "commit": _git("rev-parse", "--short", "HEAD"),
            },
            "rounds": args.rounds,
            "duration_s": args.duration,
            "summary": summary,
            "raw": results,
            **rss,
        }
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(doc, f, indent=1)
        with open(os.path.join(out_dir, "report.md"), "w") as f:
            f.write(_report(doc))
        print(_report(doc))
        print(f"written to {out_dir}")
    finally:
        for p in procs:
            p.kill()
        labmod.down(name, quiet=True)


def _git(*args) -> str:
    r = subprocess.run(
        ["git", *args], capture_output=True, text=True, cwd=os.path.dirname(__file__)
    )
    return r.stdout.strip()


def _summ(rs: list[dict]) -> dict:
    out = {}
    for k in rs[0]:
        vals = [r[k] for r in rs]
        out[k] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}
    return out


def _report(doc) -> str:
    s = doc["summary"]
    m = doc["machine"]
    lines = [
        f"# Tunnel vs no mesh ({m['cores']} cores, kernel {m['kernel']}, commit {m['commit']})",
        "",
        f"{doc['rounds']} rounds of {doc['duration_s']} s per cell, modes interleaved; medians "
        "(min-max). Same lab, same kernel path; `none` pods are outside the registry.",
        "",
        "| pair | scenario | figure | none | dabba | dabba - none | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    figs = {
        "latency": [("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"), ("p99_ms", "p99 ms")],
        "rps": [("rps", "requests/s")],
        "connrate": [("rps", "new connections/s")],
        "bulk": [("gbps", "Gbit/s")],
    }
    for pair in PAIRS:
        for scen, fl in figs.items():
            for key, label in fl:
                a, b = s[f"{pair}/{scen}/none"][key], s[f"{pair}/{scen}/dabba"][key]
                lines.append(
                    f"| {pair} | {scen} | {label} | {a['median']:.2f} ({a['min']:.2f}-{a['max']:.2f}) "
                    f"| {b['median']:.2f} ({b['min']:.2f}-{b['max']:.2f}) "
                    f"| {b['median'] - a['median']:+.2f} | {b['median'] / a['median']:.2f}x |"
                )
    lines += ["", "Tunnel CPU (both nodes' tunnels, user+system):", ""]
    for pair in PAIRS:
        for scen in ("rps", "connrate", "bulk"):
            d = s[f"{pair}/{scen}/dabba"]
            extra = (
                f", {d['tunnel_cpu_ms_per_1k']['median']:.1f} ms per 1,000 requests"
                if "tunnel_cpu_ms_per_1k" in d
                else f", {d['tunnel_cpu_s']['median'] / max(1e-9, d['bytes']['median'] / 2**30):.2f} s per GiB"
            )
            lines.append(f"- {pair} {scen}: {d['tunnel_cores']['median']:.2f} cores{extra}")
    lines += [
        "",
        f"Tunnel RSS after the run: n1 {doc['tunnel_n1_rss_mib']:.1f} MiB, "
        f"n2 {doc['tunnel_n2_rss_mib']:.1f} MiB.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
