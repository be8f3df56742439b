"""`make bench-quick` (bench/overhead.py, short) produces every figure of results.json.

No speed is asserted here: the figures and their ratios are bench/'s business.
"""

import json
import os
import re
import subprocess
import sys

from bench.overhead import FIGURES, MODES, PAIRS, VIP_MODES

PNG = b"\x89PNG\r\n\x1a\n"


def _quick_args() -> list[str]:
    with open("Makefile") as f:
        return re.search(r"^BENCH_QUICK := (.*)$", f.read(), re.M).group(1).split()


def test_bench_quick_produces_every_figure_report_and_plots(tmp_path):
    out = tmp_path / "res"
    r = subprocess.run(
        [sys.executable, "-m", "bench.overhead", *_quick_args(), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"\[ *\d+/\d+\] rep 1 latency/cross-node/none/c16 ", r.stdout)  # progress
    doc = json.loads((out / "results.json").read_text())
    assert doc["machine"]["cores"] == os.cpu_count() and doc["machine"]["envoy"]
    assert doc["machine"]["kernel"] and doc["machine"]["dabbawala"]
    figs = {
        (f["scenario"], f.get("pair"), f["mode"], f.get("conns"), f["field"]): f
        for f in doc["figures"]
    }
    for pair in PAIRS:
        for mode in MODES:
            if mode == "waypoint" and pair != "cross-node":  # HTTP through it, cross-node
                assert not any(k[1:3] == (pair, mode) for k in figs)
                continue
            if pair == "same-node-vip" and mode not in VIP_MODES:
                assert not any(k[1:3] == (pair, mode) for k in figs)  # not run: no VIP there
                continue
            for scen, fields in FIGURES.items():
                if mode == "waypoint" and scen != "latency":
                    assert not any(k[:3] == (scen, pair, mode) for k in figs)
                    continue
                conns = 16 if scen == "latency" else None
                for field in fields:
                    f = figs[(scen, pair, mode, conns, field)]
                    assert set(f) >= {"min", "median", "max", "n"}, f
                    if mode == "none" and field == "gbps_per_mesh_core":
                        assert f["median"] is None and f["n"] == 0  # no mesh, no mesh CPU
                    elif field == "gbps_per_mesh_core" and f["median"] is None:
                        # the kernel moved the bytes and the mesh processes used less than
                        # 0.05 cores (idle noise): no per-core figure then
                        cores = figs[(scen, pair, mode, conns, "mesh_cores")]
                        assert pair.startswith("same-node") and mode == "dabba", (pair, mode)
                        assert cores["median"] < 0.05, (
                            f,
                            cores,
                        )
                    else:
                        assert f["median"] is not None and f["n"] == 1, f
            lat = figs[("latency", pair, mode, 16, "errors")]
            assert lat["median"] == 0, f"{pair} {mode}: requests failed"
            assert len(doc["raw"][f"latency/{pair}/{mode}/c16"][0]["quantiles_ms"]) == 1000
    for pods in (2, 10):
        got = {f["mode"]: f for f in doc["figures"] if f["scenario"] == "memory"
               and f["pods_per_node"] == pods}  # fmt: skip
        assert set(got) == {"sidecar", "sidecar-tcp", "dabba", "waypoint"}
        assert got["waypoint"]["median"] > got["dabba"]["median"]  # dabba's and the waypoint
        assert all(f["median"] > 1 for f in got.values()), got
    report = (out / "report.md").read_text()
    for heading in ("## Targets", "## Latency at a fixed", "## Bulk throughput",
                    "## New connections per second", "## Memory", "## Plots"):  # fmt: skip
        assert heading in report, heading
    # dabba through a VIP, resolved in the kernel, against no mesh
    assert (
        "### same-node-vip" in report and "| same-node VIP new connections/s vs no mesh |" in report
    )
    assert "| waypoint added latency p50 |" in report
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 7, pngs
    assert all((out / p).read_bytes()[:8] == PNG for p in pngs)
    r = subprocess.run(
        [sys.executable, "-m", "bench.compare", str(out), str(out)], capture_output=True, text=True
    )
    assert r.returncode == 0 and " 1.00x" in r.stdout
