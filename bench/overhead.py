"""dabbawala against Envoy sidecars and against no mesh, side by side in one lab and one run.

    python -m bench.overhead [--modes none,sidecar,sidecar-tcp,dabba]
        [--scenarios latency,bulk,connrate,memory] [--duration 10] [--repeat 3]
        [--rate 1000] [--conns 4,16,64] [--out DIR]

(`make bench`; `make bench-quick` is one short repetition of everything.)

Modes, each with its own pods in the same lab (same veths, bridge, kernel):
- ``none``: pods outside any mesh (the floor);
- ``sidecar``: Envoy in every pod, Istio-style (bench/sidecar.py): iptables
  REDIRECT, HTTP connection manager with HTTP/2 mutual TLS between sidecars,
  TCP proxy for what is not HTTP;
- ``sidecar-tcp``: the same Envoys with TCP proxy only (fair to an L4 tunnel);
- ``dabba``: our agent and tunnel, eBPF capture;
- ``waypoint``: dabba with the server's service opted into a waypoint (upstream Envoy on n1,
  configured by our control plane): HTTP through the source tunnel, the waypoint and the
  destination tunnel, HBONE on both hops; cross-node latency only, against ``sidecar`` (HTTP).
Pairs: ``cross-node`` (n1 to n2) and ``same-node`` (n1 to n1), and
``same-node-vip``: n1 to n1 through a service VIP, which dabbawala resolves in
the kernel (``none`` and ``dabba`` only: without a mesh or kube-proxy in the lab
there is no VIP, so ``none`` goes to the pod's address, the floor a VIP is held
to). Repetitions interleave the modes (A B C D A B C D ...), so machine noise
hits all alike.

Scenarios:
- ``latency``: bench/loadgen.py, 1 KiB responses from nginx, a fixed rate
  (1,000 rps) on 4, 16 and 64 keep-alive connections, latency from each
  request's intended send time (p50, p90, p99, p99.9); the mesh processes'
  CPU during the run, per 1,000 requests;
- ``bulk``: iperf3, one stream: Gbit/s, and Gbit/s per mesh core;
- ``connrate``: wrk, 64 connections, a new connection per request: connections/s;
- ``memory``: summed RSS of every mesh process on node n1 with 2 pods per node
  (this lab) and with 10 (a second lab).
Output: bench/results/<date-time>-overhead/: results.json, report.md, plots.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

from agent.control import ca as camod
from agent.lab import apps, mesh
from agent.lab import lab as labmod
from agent.lab.spec import ClusterSpec, PodSpec, WaypointSpec
from agent.ztunnel.workers import cpu_seconds
from bench import sidecar
from bench.datapath import rss_kib

MODES = ("none", "sidecar", "sidecar-tcp", "dabba", "waypoint")
SCENARIOS = ("latency", "bulk", "connrate", "memory")
PAIRS = ("cross-node", "same-node", "same-node-vip")
VIP_MODES = ("none", "dabba")  # the modes of the same-node-vip pair
VIP = "10.96.0.80"  # dabba's service in front of its same-node server (n1-p2)
POD_OF = {"dabba": (1, 2), "none": (3, 4), "sidecar": (5, 6), "sidecar-tcp": (7, 8),
          "waypoint": (9, 10)}  # fmt: skip
MESHED = ("dabba", "waypoint")  # modes whose pods are in dabbawala's mesh
WAYPOINT = "bench-wp"  # the waypoint (its pod on n1) of the waypoint mode's service
WP_VIP = "10.96.0.81"  # that service, in front of n2-p10
VARIANT = {"sidecar": "http", "sidecar-tcp": "tcp"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pods_for(mode: str, pair: str) -> tuple[str, str]:
    c, s = POD_OF[mode]
    return f"n1-p{c}", (f"n2-p{s}" if pair == "cross-node" else f"n1-p{s}")


def target(L, mode: str, pair: str, server: str) -> str:
    """Where the client connects: dabba's VIP for the same-node-vip pair, the waypoint mode's
    service, else the server."""
    if mode == "waypoint":
        return WP_VIP
    return VIP if (pair, mode) == ("same-node-vip", "dabba") else L.pod(server).ip


def cells_of(pairs, scenarios, conns, modes, repeat) -> list[tuple]:
    """(repetition, pair, scenario, connections, mode) of one run, modes interleaved."""
    out = []
    for rep in range(repeat):
        for pair in pairs:
            for scen in ("latency", "bulk", "connrate"):
                if scen not in scenarios:
                    continue
                for c in conns if scen == "latency" else [None]:
                    for mode in modes:
                        if mode == "waypoint" and (pair, scen) != ("cross-node", "latency"):
                            continue  # HTTP through a waypoint: what it is for
                        if pair != "same-node-vip" or mode in VIP_MODES:
                            out.append((rep, pair, scen, c, mode))
    return out


class Progress:
    """One status line per step, with how far along and how long is left."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.monotonic()

    def step(self, what: str, result: str) -> None:
        self.done += 1
        el = time.monotonic() - self.t0
        left = el / self.done * (self.total - self.done)
        print(
            f"[{self.done:>3}/{self.total}] {what:<44} {result}   "
            f"({el:.0f}s elapsed, ~{left:.0f}s left)",
            flush=True,
        )


class Bench:
    def __init__(self, args):
        self.a = args
        self.procs: list[subprocess.Popen] = []
        self.work = tempfile.mkdtemp(prefix="dabba-bench-")
        os.chmod(self.work, 0o755)
        self.mesh_pids: dict[str, list[int]] = {m: [] for m in MODES}
        self.rss_pids: dict[str, list[int]] = {m: [] for m in MODES}  # on n1

    # ---- the lab ---------------------------------------------------------------------------
    def build(self, name: str, per_node: int, modes) -> labmod.Lab:
        """per_node pods of each mode on each node, numbered as POD_OF (extra pods after 8)."""
        specs = []
        for n in (1, 2):
            for j in range(1, 11):
                specs.append(PodSpec(name=f"n{n}-p{j}", node=f"n{n}"))
            for mode in modes:  # the memory lab: more pods of each mode (the waypoint mode
                if mode == "waypoint":  # adds its waypoint to dabba's pods and processes)
                    continue
                for k in range(per_node - 2):
                    specs.append(PodSpec(name=f"n{n}-{_short(mode)}{k}", node=f"n{n}"))
        wps = [WaypointSpec(WAYPOINT, "n1")] if "waypoint" in modes else []
        L = labmod.up(name, ClusterSpec(2, specs, waypoints=wps))
        keep = {p.name for p in L.pods if _mode_of(p.name) in MESHED} | {w.name for w in wps}
        enrolled = {n: sum(1 for p in L.pods if p.node == n and _mode_of(p.name) in MESHED)
                    for n in ("n1", "n2")}  # fmt: skip
        if any(m in modes for m in MESHED):
            up = mesh.up(L, capture=True)
            self.procs += list(up.values())
            reg = os.path.join(mesh.paths(L)["registry"], "lab.yaml")
            with open(reg) as f:
                docs = [d for d in yaml.safe_load_all(f) if d["metadata"]["name"] in keep]
            vip_server = pods_for("dabba", "same-node-vip")[1]
            for d in docs:
                if d["metadata"]["name"] == vip_server:
                    d["metadata"]["labels"] = {
                        **(d["metadata"].get("labels") or {}),
                        "bench": "vip",
                    }
            wp_server = pods_for("waypoint", "cross-node")[1]
            for d in docs:
                if d["metadata"]["name"] == wp_server:
                    d["metadata"]["labels"] = {**(d["metadata"].get("labels") or {}), "bench": "wp"}
            docs.append({
                "apiVersion": "dabbawala.io/v1", "kind": "Service",
                "metadata": {"name": "bench-vip", "namespace": "default"},
                "spec": {"vip": VIP, "selector": {"bench": "vip"},
                         "ports": [{"port": 8080, "targetPort": 8080},
                                   {"port": 5501, "targetPort": 5501}]},
            })  # fmt: skip
            if wps:
                docs.append({
                    "apiVersion": "dabbawala.io/v1", "kind": "Service",
                    "metadata": {"name": "bench-waypoint", "namespace": "default",
                                 "labels": {"istio.io/use-waypoint": WAYPOINT}},
                    "spec": {"vip": WP_VIP, "selector": {"bench": "wp"},
                             "ports": [{"port": 8080, "targetPort": 8080}]},
                })  # fmt: skip
            with open(reg, "w") as f:
                yaml.safe_dump_all(docs, f, sort_keys=False)  # only dabba's pods are in its mesh
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                st = [mesh.agent_status(L, n) for n in ("n1", "n2")]
                vip_held = st[0] and st[0].get("kernel_services", {}).get("service_ports") == 2
                if (all(s and len(s["workloads"]) == enrolled[n] for s, n in zip(st, ("n1", "n2"), strict=False))
                        and vip_held):  # fmt: skip
                    break
                time.sleep(0.2)
            for n in ("n1", "n2"):
                st = mesh.agent_status(L, n)
                pids = [st["pid"], st["tunnel"]["pid"]]
                for m in MESHED:  # the same agents and tunnels serve both modes
                    self.mesh_pids[m] += pids
                    if n == "n1":
                        self.rss_pids[m] += pids
            if wps:  # the waypoint (on n1): its supervisor and its Envoy
                sup = up[f"waypoint-default/{WAYPOINT}"]
                envoy = json.loads(L.run(WAYPOINT, ["curl", "-s", "http://127.0.0.1:15020/status"])
                                   .stdout)["envoy_pid"]  # fmt: skip
                self.mesh_pids["waypoint"] += [sup.pid, envoy]
                self.rss_pids["waypoint"] += [sup.pid, envoy]
        ca = camod.CA.load_or_create(os.path.join(self.work, name, "ca"), sidecar.TD)
        for mode, variant in VARIANT.items():
            if mode not in modes:
                continue
            for p in L.pods:
                if _mode_of(p.name) != mode:
                    continue
                proc = sidecar.start(L, p, os.path.join(self.work, name, p.name), variant, ca)
                self.procs.append(proc)
                self.mesh_pids[mode].append(proc.pid)
                if p.node == "n1":
                    self.rss_pids[mode].append(proc.pid)
        for p in L.pods:
            if _mode_of(p.name) in VARIANT and _mode_of(p.name) in modes:
                _wait_listen(L, p.name, sidecar.OUTBOUND)
        return L

    def servers(self, L) -> None:
        for p in L.pods:
            j = p.name.split("-p")[-1]
            if not j.isdigit() or int(j) % 2:
                continue
            self.procs.append(apps.start_nginx(L, p.name, 8080, os.path.join(self.work, p.name)))
            self.procs.append(
                L.popen(p.name, ["iperf3", "-s", "-B", p.ip, "-p", "5501"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )  # fmt: skip
        for p in L.pods:
            j = p.name.split("-p")[-1]
            if j.isdigit() and int(j) % 2 == 0:
                _wait_listen(L, p.name, 8080)
                _wait_listen(L, p.name, 5501)

    def cpu(self, mode: str) -> float:
        return sum(cpu_seconds(p) or 0.0 for p in self.mesh_pids[mode])

    # ---- scenarios -------------------------------------------------------------------------
    def latency(self, L, mode, pair, conns) -> dict:
        c, s = pods_for(mode, pair)
        cpu0 = self.cpu(mode)
        r = L.run(
            c,
            [sys.executable, "-m", "bench.loadgen", "--url", f"http://{target(L, mode, pair, s)}:8080/",
             "--rate", str(self.a.rate), "--conns", str(conns),
             "--duration", str(self.a.duration), "--warmup", "1"],
            timeout=self.a.duration + 120, cwd=ROOT,
        )  # fmt: skip
        res = json.loads(r.stdout)
        cores = (self.cpu(mode) - cpu0) / (self.a.duration + 1)
        res["mesh_cores"] = cores
        res["mesh_cores_per_1k_rps"] = cores / max(res["achieved_rps"], 1) * 1000
        return res

    def bulk(self, L, mode, pair) -> dict:
        c, s = pods_for(mode, pair)
        cpu0 = self.cpu(mode)
        r = L.run(
            c, ["iperf3", "-c", target(L, mode, pair, s), "-p", "5501", "-t", str(self.a.duration),
                "-J"],
            timeout=self.a.duration + 60,
        )  # fmt: skip
        end = json.loads(r.stdout)["end"]
        cores = (self.cpu(mode) - cpu0) / self.a.duration
        gbps = end["sum_received"]["bits_per_second"] / 1e9
        return {
            "gbps": gbps,
            "mesh_cores": cores,
            "gbps_per_mesh_core": gbps / cores if cores >= 0.05 else None,  # else: idle noise
        }

    def connrate(self, L, mode, pair) -> dict:
        c, s = pods_for(mode, pair)
        out = L.run(
            c,
            ["wrk", "-t", "2", "-c", "64", "-d", f"{max(1, round(self.a.duration))}s", "-H", "Connection: close",
             "--timeout", "10s", f"http://{target(L, mode, pair, s)}:8080/"],
            timeout=self.a.duration + 60,
        ).stdout  # fmt: skip
        errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
        return {
            "conns_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "errors": errors,
        }

    def memory(self, pods_per_node: int) -> dict:
        return {
            mode: sum(rss_kib(p) for p in self.rss_pids[mode]) / 1024
            for mode in self.a.modes
            if mode != "none"
        }


def _short(mode: str) -> str:
    return {"dabba": "d", "sidecar": "s", "sidecar-tcp": "t", "none": "n", "waypoint": "w"}[mode]


def _mode_of(pod: str) -> str:
    if pod == WAYPOINT:
        return "gateway"  # the waypoint's own pod: no mode's client or server
    tail = pod.split("-", 1)[1]
    if tail.startswith("p") and tail[1:].isdigit():
        j = int(tail[1:])
        return next(m for m, ab in POD_OF.items() if j in ab)
    return {"d": "dabba", "s": "sidecar", "t": "sidecar-tcp", "n": "none", "w": "waypoint"}[tail[0]]


def _wait_listen(L, pod: str, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = L.run(pod, ["ss", "-Hltn", f"sport = :{port}"], check=False)
        if r.stdout.strip():
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {pod}:{port} after {timeout}s")


def _warm(L, modes) -> None:
    """A request from every mesh pod on n1 to its mode's server on n2 (each proxy has served)."""
    for p in L.pods:
        mode = _mode_of(p.name)
        if mode in modes and mode != "none" and p.node == "n1":
            target = L.pod(pods_for(mode, "cross-node")[1]).ip
            L.run(p.name, ["curl", "-s", "-o", "/dev/null", "--max-time", "5",
                           f"http://{target}:8080/"], check=False)  # fmt: skip


def summarize(values: list) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"min": None, "median": None, "max": None, "n": 0}
    return {
        "min": min(vals),
        "median": statistics.median(vals),
        "max": max(vals),
        "n": len(vals),
    }


def versions() -> dict:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                       cwd=ROOT)  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()  # fmt: skip
    return {
        "dabbawala": r.stdout.strip() + ("-dirty" if dirty else ""),
        "envoy": sidecar.envoy_version(),
        "kernel": platform.release(),
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def _loadgen_self_test() -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--self-test", "2", "--rate", "1000",
         "--duration", "3"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"the load generator failed its self-test: {r.stderr.strip()}")
    d = json.loads(r.stdout)
    return {k: d[k] for k in ("known_delay_ms", "p50_ms", "p99_ms", "min_ms", "resolution_ms")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.overhead", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--duration", type=float, default=10, help="seconds per run")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of every cell")
    ap.add_argument("--rate", type=float, default=1000, help="requests/s of the latency runs")
    ap.add_argument("--conns", default="4,16,64", help="connections of the latency runs")
    ap.add_argument(
        "--out", default=None, help="result folder (default bench/results/<stamp>-overhead)"
    )
    a = ap.parse_args(argv)
    a.modes = [m for m in a.modes.split(",") if m]
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    a.conns = [int(x) for x in a.conns.split(",") if x]
    for m in a.modes:
        if m not in MODES:
            ap.error(f"--modes: {m!r} is not one of {', '.join(MODES)}")
    for s in a.scenarios:
        if s not in SCENARIOS:
            ap.error(f"--scenarios: {s!r} is not one of {', '.join(SCENARIOS)}")
    if os.geteuid() != 0:
        ap.error("run as root: it builds a lab of network namespaces")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = a.out or os.path.join(ROOT, "bench", "results", f"{stamp}-overhead")
    os.makedirs(out, exist_ok=True)
    b = Bench(a)
    name = f"bo{os.getpid() % 10000}"
    raw: dict[str, list] = {}
    cells = cells_of(PAIRS, a.scenarios, a.conns, a.modes, a.repeat)
    prog = Progress(len(cells) + (2 if "memory" in a.scenarios else 0))
    started = time.time()
    machine = versions()  # the commit measured: at the start (HEAD may move during the run)
    try:
        L = b.build(name, 2, a.modes)
        b.servers(L)
        if "memory" in a.scenarios:  # measured like the 10-pod lab: started, one request each
            _warm(L, a.modes)
            raw["memory/2"] = [b.memory(2)]
            prog.step("memory, 2 pods per node", _mib(raw["memory/2"][0]))
        for rep, pair, scen, conns, mode in cells:
            key = f"{scen}/{pair}/{mode}" + (f"/c{conns}" if conns else "")
            if scen == "latency":
                r = b.latency(L, mode, pair, conns)
                shown = (
                    f"p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms cpu {r['mesh_cores']:.2f}"
                )
            elif scen == "bulk":
                r = b.bulk(L, mode, pair)
                shown = f"{r['gbps']:.2f} Gbit/s cpu {r['mesh_cores']:.2f}"
            else:
                r = b.connrate(L, mode, pair)
                shown = f"{r['conns_per_s']:.0f} conn/s"
            raw.setdefault(key, []).append(r)
            prog.step(f"rep {rep + 1} {key}", shown)
        if "memory" in a.scenarios:  # and after every run above: what load left behind
            raw["memory_after_load/2"] = [b.memory(2)]
    finally:
        for p in b.procs:
            p.kill()
        labmod.down(name, quiet=True)
    if "memory" in a.scenarios:
        b2 = Bench(a)
        name2 = name + "m"
        try:
            L2 = b2.build(name2, 10, [m for m in a.modes if m != "none"])
            b2.servers(L2)
            _warm(L2, a.modes)
            raw["memory/10"] = [b2.memory(10)]
            prog.step("memory, 10 pods per node", _mib(raw["memory/10"][0]))
        finally:
            for p in b2.procs:
                p.kill()
            labmod.down(name2, quiet=True)
            shutil.rmtree(b2.work, ignore_errors=True)
    shutil.rmtree(b.work, ignore_errors=True)
    doc = {
        "machine": machine,
        "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        "config": {
            "modes": a.modes,
            "scenarios": a.scenarios,
            "duration_s": a.duration,
            "repeat": a.repeat,
            "rate": a.rate,
            "conns": a.conns,
        },
        "figures": figures(raw),
        "raw": raw,
        # the load generator against a server that answers after 2 ms, on loopback: what its
        # latencies are worth (bench/loadgen.py fails a run that sends early)
        "loadgen_self_test": _loadgen_self_test(),
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    from bench import report

    report.write(doc, out)
    print(f"\nresults: {out}/results.json, report.md, plots")
    return 0


def _mib(d: dict) -> str:
    return ", ".join(f"{k} {v:.0f} MiB" for k, v in d.items())


FIGURES = {  # scenario -> fields summarized (min/median/max over repetitions)
    "latency": ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "achieved_rps", "errors", "mesh_cores",
                "mesh_cores_per_1k_rps"),
    "bulk": ("gbps", "mesh_cores", "gbps_per_mesh_core"),
    "connrate": ("conns_per_s", "errors"),
}  # fmt: skip


def figures(raw: dict) -> list[dict]:
    """Every figure: mode, scenario, pair, connections, field, repetitions, min/median/max."""
    out = []
    for key, runs in raw.items():
        parts = key.split("/")
        scen = parts[0]
        if scen.startswith("memory"):
            for mode, mib in runs[0].items():
                out.append({"scenario": scen, "pods_per_node": int(parts[1]), "mode": mode,
                            "field": "rss_mib", **summarize([mib])})  # fmt: skip
            continue
        pair, mode = parts[1], parts[2]
        conns = int(parts[3][1:]) if len(parts) > 3 else None
        for field in FIGURES[scen]:
            out.append({"scenario": scen, "pair": pair, "mode": mode, "conns": conns,
                        "field": field, **summarize([r.get(field) for r in runs])})  # fmt: skip
    return out


if __name__ == "__main__":
    sys.exit(main())
