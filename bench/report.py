"""report.md and plots from a results.json of bench/overhead.py.

    python -m bench.report RESULTS_DIR      (re-render an existing folder)

Tables give each mode's median (min-max over repetitions), its ratio against
``sidecar`` and, for latency, the cost it adds over ``none``; the targets of
the benchmark issue are checked against the same run.
"""

from __future__ import annotations

import json
import os
import sys

PAIRS = ("cross-node", "same-node", "same-node-vip")  # bench/overhead.py's

TARGETS = [
    # (what, scenario, pair, field, conns, compare, bound): compare "added" = (mode - none) /
    # (sidecar - none), "ratio" = mode / sidecar, "vs none" = mode / none, "growth" = dabba
    # after the whole run / dabba at its start; bound: ("<=", x) or (">=", x). The
    # same-node-vip pair has no sidecar: its "added" is against the same-node pair's sidecar
    # (what a sidecar mesh adds on the node). The bounds are those of the issues: cross-node
    # HBONE (16) and the same-node kernel path (15)
    ("cross-node added latency p50", "latency", "cross-node", "p50_ms", 16, "added", ("<=", 0.5)),
    ("cross-node added latency p99", "latency", "cross-node", "p99_ms", 16, "added", ("<=", 0.5)),
    ("CPU per 1,000 rps (cross-node)", "latency", "cross-node", "mesh_cores_per_1k_rps", 16,
     "ratio", ("<=", 0.5)),
    ("throughput per mesh core (cross-node)", "bulk", "cross-node", "gbps_per_mesh_core", None,
     "ratio", (">=", 1.0)),
    ("new connections/s cross-node", "connrate", "cross-node", "conns_per_s", None, "ratio",
     (">=", 1.0)),
    ("memory per node, 10 pods", "memory", None, "rss_mib", None, "ratio", ("<=", 0.1)),
    ("memory after the whole run vs its start (2 pods)", "memory_after_load", None, "rss_mib",
     None, "growth", ("<=", 1.2)),
    ("same-node added latency p50", "latency", "same-node", "p50_ms", 16, "added", ("<=", 0.05)),
    ("same-node new connections/s vs no mesh", "connrate", "same-node", "conns_per_s", None,
     "vs none", (">=", 0.8)),
    ("same-node VIP new connections/s vs no mesh", "connrate", "same-node-vip", "conns_per_s",
     None, "vs none", (">=", 0.8)),
    ("same-node VIP added latency p50", "latency", "same-node-vip", "p50_ms", 16, "added",
     ("<=", 0.05)),
    # the waypoint mode (HTTP through the waypoint) against the HTTP sidecar: the waypoints
    # issue (17)
    ("waypoint added latency p50", "latency", "cross-node", "p50_ms", 16, "added", ("<=", 1.0),
     "waypoint"),
    ("waypoint added latency p99", "latency", "cross-node", "p99_ms", 16, "added", ("<=", 1.0),
     "waypoint"),
    ("waypoint CPU per 1,000 rps", "latency", "cross-node", "mesh_cores_per_1k_rps", 16,
     "ratio", ("<=", 0.8), "waypoint"),
    ("waypoint memory per node, 10 pods", "memory", None, "rss_mib", None, "ratio",
     ("<=", 0.3), "waypoint"),
]  # fmt: skip


def _get(doc, scenario, pair, mode, field, conns=None, pods=None):
    for f in doc["figures"]:
        if (
            f["scenario"] == scenario
            and f["mode"] == mode
            and f["field"] == field
            and f.get("pair") == pair
            and f.get("conns") == conns
            and (pods is None or f.get("pods_per_node") == pods)
        ):
            return f
    return None


def _fmt(f, digits=2) -> str:
    if f is None or f["median"] is None:
        return "-"
    m, lo, hi = f["median"], f["min"], f["max"]
    if f["n"] == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def targets(doc) -> list[dict]:
    out = []
    for what, scen, pair, field, conns, how, (op, bound), *mode in TARGETS:
        pods = {"memory": 10, "memory_after_load": 2}.get(scen)
        modes3 = (mode[0] if mode else "dabba", "sidecar", "none")
        d, s, n = (_get(doc, scen, pair, mo, field, conns, pods) for mo in modes3)
        if pair == "same-node-vip":  # no sidecar through a VIP: the same-node one
            s = _get(doc, scen, "same-node", "sidecar", field, conns, pods)
        value = None
        if how == "growth":
            start = _get(doc, "memory", pair, "dabba", field, conns, pods)
            if d and start and d["median"] is not None and start["median"]:
                value = d["median"] / start["median"]
        elif how == "vs none":
            if d and n and d["median"] is not None and n["median"]:
                value = d["median"] / n["median"]
        elif d and s and d["median"] is not None and s["median"]:
            if how == "ratio":
                value = d["median"] / s["median"]
            elif n and n["median"] is not None and s["median"] - n["median"] > 0:
                value = (d["median"] - n["median"]) / (s["median"] - n["median"])
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        out.append({"target": what, "value": value, "bound": f"{op} {bound}x", "met": met})
    return out


def markdown(doc) -> str:
    m, c = doc["machine"], doc["config"]
    modes = c["modes"]
    L = [
        "# dabbawala vs Envoy sidecars vs no mesh",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), kernel {m['kernel']}, Python {m['python']}. "
        f"dabbawala {m['dabbawala']}, Envoy {m['envoy']}. Started {doc['started']}, "
        f"took {doc['seconds']:.0f} s.",
        "",
        f"{c['repeat']} repetition(s) of {c['duration_s']:g} s per cell, modes interleaved; "
        "each cell: median (min-max). `sidecar` is Envoy as an Istio-style sidecar (HTTP "
        "connection manager, HTTP/2 mutual TLS between sidecars), `sidecar-tcp` the same with a "
        'TCP proxy only, `none` no mesh. Ratios are against `sidecar`; "added" is the cost over '
        "`none`.",
        "",
    ]
    if "sidecar" in modes and "dabba" in modes:
        L += ["## Targets (dabba against sidecar, this run)", "", "| target | value | bound | met |",
              "|---|---|---|---|"]  # fmt: skip
        for t in targets(doc):
            v = "-" if t["value"] is None else f"{t['value']:.2f}x"
            met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            L.append(f"| {t['target']} | {v} | {t['bound']} | {met} |")
        L.append("")
    lat = sorted({f["conns"] for f in doc["figures"] if f["scenario"] == "latency"})
    if lat:
        L += [f"## Latency at a fixed {c['rate']:g} requests/s (ms, from intended send time)", ""]
        for pair in PAIRS:
            L += [f"### {pair}", "", "| conns | mode | p50 | p90 | p99 | p99.9 | added p50 | "
                  "added p99 | p99 vs sidecar | errors |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for conns in lat:
                base = {
                    k: _get(doc, "latency", pair, "none", k, conns) for k in ("p50_ms", "p99_ms")
                }
                side = _get(doc, "latency", pair, "sidecar", "p99_ms", conns)
                for mode in modes:

                    def g(k, mode=mode, conns=conns, pair=pair):
                        return _get(doc, "latency", pair, mode, k, conns)

                    if g("p50_ms") is None:
                        continue

                    def add(k, g=g, base=base):
                        return f"{g(k)['median'] - base[k]['median']:+.2f}" if base[k] else "-"

                    ratio = f"{g('p99_ms')['median'] / side['median']:.2f}x" if side else "-"
                    L.append(
                        f"| {conns} | {mode} | {_fmt(g('p50_ms'))} | {_fmt(g('p90_ms'))} | "
                        f"{_fmt(g('p99_ms'))} | {_fmt(g('p999_ms'))} | {add('p50_ms')} | "
                        f"{add('p99_ms')} | {ratio} | {_fmt(g('errors'), 0)} |"
                    )
            L.append("")
        L += ["### Mesh CPU during the fixed-rate runs (cores per 1,000 requests/s, all mesh "
              "processes of both nodes)", "", "| pair | conns | " + " | ".join(modes) + " |",
              "|---|---|" + "---|" * len(modes)]  # fmt: skip
        for pair in PAIRS:
            for conns in lat:
                cells = [_fmt(_get(doc, "latency", pair, m, "mesh_cores_per_1k_rps", conns), 3)
                         for m in modes]  # fmt: skip
                L.append(f"| {pair} | {conns} | " + " | ".join(cells) + " |")
        L.append("")
    for scen, field, title, digits in (
        ("bulk", "gbps", "Bulk throughput, one iperf3 stream (Gbit/s)", 2),
        ("bulk", "gbps_per_mesh_core", "Throughput per mesh core (Gbit/s per core)", 2),
        (
            "connrate",
            "conns_per_s",
            "New connections per second (wrk, 64 conns, Connection: close)",
            0,
        ),
    ):
        if not any(f["scenario"] == scen for f in doc["figures"]):
            continue
        L += [f"## {title}", "", "| pair | " + " | ".join(modes) + " | dabba vs sidecar |",
              "|---|" + "---|" * (len(modes) + 1)]  # fmt: skip
        for pair in PAIRS:
            vals = {mo: _get(doc, scen, pair, mo, field) for mo in modes}
            d, s = vals.get("dabba"), vals.get("sidecar")
            ratio = (
                f"{d['median'] / s['median']:.2f}x"
                if d and s and d["median"] and s["median"]
                else "-"
            )
            L.append(f"| {pair} | " + " | ".join(_fmt(vals[mo], digits) for mo in modes)
                     + f" | {ratio} |")  # fmt: skip
        L.append("")
    mem = [f for f in doc["figures"] if f["scenario"] == "memory"]
    if mem:
        mm = [mo for mo in modes if mo != "none"]
        L += ["## Memory: summed RSS of every mesh process on node n1 (MiB)", "",
              "| pods per node | " + " | ".join(mm) + " | dabba vs sidecar |",
              "|---|" + "---|" * (len(mm) + 1)]  # fmt: skip
        for pods in sorted({f["pods_per_node"] for f in mem}):
            vals = {mo: _get(doc, "memory", None, mo, "rss_mib", None, pods) for mo in mm}
            d, s = vals.get("dabba"), vals.get("sidecar")
            ratio = f"{d['median'] / s['median']:.2f}x" if d and s else "-"
            L.append(f"| {pods} | " + " | ".join(_fmt(vals[mo], 1) for mo in mm) + f" | {ratio} |")
        after = [f for f in doc["figures"] if f["scenario"] == "memory_after_load"]
        if after:
            L.append(
                "| 2, after every run above | "
                + " | ".join(
                    _fmt(next((f for f in after if f["mode"] == mo), None), 1) for mo in mm
                )
                + " | |"
            )
        L += ["", "Measured after start-up and one request through every mesh pod (the last row: "
              "after the whole benchmark). sidecar: one Envoy per pod (concurrency 2, like "
              "Istio's default); dabba: the node's agent and tunnel, whatever the number of "
              "pods.", ""]  # fmt: skip
    return "\n".join(L)


def plots(doc, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    modes = doc["config"]["modes"]
    raw = doc["raw"]
    conns = sorted({f["conns"] for f in doc["figures"] if f["scenario"] == "latency"})
    for pair in ("cross-node", "same-node"):
        if not conns:
            break
        c = 16 if 16 in conns else conns[0]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode in modes:
            runs = raw.get(f"latency/{pair}/{mode}/c{c}")
            if not runs:
                continue
            q = sorted(x for r in runs for x in r["quantiles_ms"])
            ys = [i / len(q) for i in range(len(q))]
            ax.plot(q, ys, label=mode)
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, from intended send time)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"Latency CDF, {pair}, {doc['config']['rate']:g} rps, {c} connections")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        path = os.path.join(out, f"latency-cdf-{pair}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    bars = [
        ("latency", "mesh_cores_per_1k_rps", "Mesh CPU, cores per 1,000 rps (16 conns)", 16, None),
        ("bulk", "gbps", "Bulk throughput, Gbit/s", None, None),
        ("bulk", "gbps_per_mesh_core", "Gbit/s per mesh core", None, None),
        ("connrate", "conns_per_s", "New connections per second", None, None),
    ]
    for scen, field, title, conn, _ in bars:
        if not any(f["scenario"] == scen for f in doc["figures"]):
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(1, len(modes))
        for i, mode in enumerate(modes):
            xs, hs, errs = [], [], []
            for j, pair in enumerate(("cross-node", "same-node")):
                f = _get(doc, scen, pair, mode, field, conn)
                if f is None or f["median"] is None:
                    continue
                xs.append(j + i * width)
                hs.append(f["median"])
                errs.append([[f["median"] - f["min"]], [f["max"] - f["median"]]])
            if xs:
                yerr = [[e[0][0] for e in errs], [e[1][0] for e in errs]]
                ax.bar(xs, hs, width, yerr=yerr, label=mode, capsize=3)
        ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(2)])
        ax.set_xticklabels(["cross-node", "same-node"])
        ax.set_title(title)
        ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
        path = os.path.join(out, f"{scen}-{field}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    mem = [f for f in doc["figures"] if f["scenario"] == "memory"]
    if mem:
        fig, ax = plt.subplots(figsize=(7, 4))
        mm = [mo for mo in modes if mo != "none"]
        podsets = sorted({f["pods_per_node"] for f in mem})
        width = 0.8 / max(1, len(mm))
        for i, mode in enumerate(mm):
            hs = [(_get(doc, "memory", None, mode, "rss_mib", None, p) or {}).get("median") or 0
                  for p in podsets]  # fmt: skip
            ax.bar([j + i * width for j in range(len(podsets))], hs, width, label=mode)
        ax.set_xticks([j + width * (len(mm) - 1) / 2 for j in range(len(podsets))])
        ax.set_xticklabels([f"{p} pods per node" for p in podsets])
        ax.set_ylabel("MiB (summed RSS of mesh processes, one node)")
        ax.set_title("Memory")
        ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
        path = os.path.join(out, "memory.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def write(doc, out: str) -> None:
    text = markdown(doc)
    made = plots(doc, out)
    if made:
        text += (
            "\n## Plots\n\n"
            + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in made)
            + "\n"
        )
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    d = sys.argv[1]
    with open(os.path.join(d, "results.json")) as f:
        write(json.load(f), d)
