"""Control-plane figures: certificate issuance rate, policy propagation, agent memory.

    python -m bench.control [--n 500]

- issuance: CA.issue() in-process (CSR validation + signing), and SignWorkload
  over gRPC/mTLS on loopback from one client, sequential;
- policy propagation: registry file write -> node's Watch stream delivers the
  snapshot with the change (in-process server on loopback, poll 0.5 s as
  `dabba control serve` uses);
- agent memory: RSS of a lab agent with a control plane, after it joined and
  holds certificates (needs root: builds a lab).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import statistics
import tempfile
import time

from agent.control import ca as camod
from agent.control.proto import control_pb2 as pb
from agent.control.server import ControlConfig, ControlServer
from agent.node import rpc
from agent.node.control_client import join

REG = """apiVersion: dabbawala.io/v1
kind: Workload
metadata: {name: w, namespace: bench}
spec: {serviceAccount: w, node: n1, ip: 10.0.0.1}
"""


def issue_inprocess(n: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        ca = camod.CA.load_or_create(d, "cluster.local")
        uri = camod.spiffe_id("cluster.local", "bench", "w")
        csrs = [camod.make_csr(camod.new_key(), uri) for _ in range(n)]
        t = time.perf_counter()
        for c in csrs:
            ca.issue(c, uri)
        return n / (time.perf_counter() - t)


async def grpc_figures(n: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        reg = os.path.join(d, "reg")
        os.makedirs(reg)
        with open(os.path.join(reg, "w.yaml"), "w") as f:
            f.write(REG)
        cfg = ControlConfig(
            state_dir=os.path.join(d, "state"),
            registry_dir=reg,
            listen="127.0.0.1:0",
            join_listen="127.0.0.1:0",
            server_names=["127.0.0.1"],
        )
        srv = ControlServer(cfg)
        await srv.start()
        try:
            key, cert = await join(
                f"127.0.0.1:{srv.join_port}",
                srv.cp.ca.bundle_pem(),
                "n1",
                srv.cp.tokens.create("n1", 60),
                "10.0.0.1",
            )
            uri = camod.spiffe_id("cluster.local", "bench", "w")
            csrs = [camod.make_csr(camod.new_key(), uri) for _ in range(n)]
            # the node's key and chain as files, where the agent's client reads them
            kf, cf = os.path.join(d, "node-key.pem"), os.path.join(d, "node-chain.pem")
            for path, pem in ((kf, key), (cf, cert.cert_chain_pem)):
                with open(path, "wb") as f:
                    f.write(pem)
            async with rpc.Channel(
                f"127.0.0.1:{srv.control_port}", srv.cp.ca.bundle_pem(), cf, kf
            ) as ch:
                stub = rpc.ControlStub(ch)
                t = time.perf_counter()
                for c in csrs:
                    await stub.SignWorkload(
                        pb.SignWorkloadRequest(namespace="bench", name="w", csr_pem=c)
                    )
                rate = n / (time.perf_counter() - t)
                stream = stub.Watch(pb.WatchRequest())
                await anext(stream)
                lat = []
                for i in range(10):
                    await asyncio.sleep(random.uniform(0.3, 1.3))  # do not phase-lock with the poll
                    t = time.perf_counter()
                    with open(os.path.join(reg, "p.yaml"), "w") as f:
                        f.write(
                            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                            f"metadata: {{name: p{i}, namespace: bench}}\nspec: {{action: DENY, rules: [{{}}]}}\n"
                        )
                    while True:
                        s = await anext(stream)
                        if any(p.name == f"p{i}" for p in s.policies):
                            break
                    lat.append((time.perf_counter() - t) * 1000)
                await stream.aclose()
            return {
                "grpc_issue_per_s": round(rate, 1),
                "policy_propagation_ms": {
                    "min": round(min(lat)),
                    "median": round(statistics.median(lat)),
                    "max": round(max(lat)),
                    "n": len(lat),
                },
            }
        finally:
            await srv.stop()


def agent_memory() -> dict | None:
    if os.geteuid() != 0:
        return None
    from agent.lab import lab as labmod
    from agent.lab import mesh, spec

    name = f"bc{os.getpid() % 100000}"
    L = labmod.up(name, spec.default_spec(1, 10))
    try:
        procs = mesh.up(L)
        time.sleep(2)

        def rss(pid):
            with open(f"/proc/{pid}/status") as f:
                return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024

        return {
            "agent_rss_mib_10_pods": round(rss(procs["n1"].pid), 1),
            "control_rss_mib": round(rss(procs["control"].pid), 1),
        }
    finally:
        labmod.down(name, quiet=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    a = ap.parse_args()
    res = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "inprocess_issue_per_s": round(issue_inprocess(a.n), 1),
    }
    res.update(asyncio.run(grpc_figures(a.n)))
    res["memory"] = agent_memory()
    out = os.path.join(
        os.path.dirname(__file__),
        "results",
        datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-control",
    )
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
