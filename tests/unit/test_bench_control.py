"""bench/control.py runs against a real control plane on loopback, through the agent's own
client: its issuance rate and its ten policy propagations are measured (it broke once, unseen,
when the agent's client changed)."""

import asyncio

from bench import control


def test_the_control_plane_benchmark_measures_issuance_and_propagation():
    res = asyncio.run(asyncio.wait_for(control.grpc_figures(20), 60))
    assert res["grpc_issue_per_s"] > 0
    prop = res["policy_propagation_ms"]
    assert prop["n"] == 10 and 0 <= prop["min"] <= prop["median"] <= prop["max"]
