"""The ctypes mirrors (agent/bpf/abi.py) match the types bcc derives from include/types.h."""

import ctypes
import os
import shutil

import pytest

from agent.bpf import abi, names
from agent.bpf.loader import Datapath, FlowProgram, bpf_source_dir
from tests.conftest import unique

# (mirror, program source, map, "Key" or "Leaf")
CASES = [
    (abi.Workload, "sockops.c", names.MAP_WORKLOADS, "Leaf"),
    (abi.Config, "connect.c", names.MAP_CFG, "Leaf"),
    (abi.Capture, "sockops.c", names.MAP_CAP_TUPLE, "Leaf"),
    (abi.Tuple, "sockops.c", names.MAP_CAP_TUPLE, "Key"),
    (abi.Lpm, "connect.c", names.MAP_EXCL_NET, "Key"),
    (abi.Flow, "sockops.c", names.MAP_FLOWS, "Leaf"),
    (abi.Ip6, "connect.c", names.MAP_NODE_IPS, "Key"),
    (abi.IpPort, "guard.c", names.MAP_PORT_MTLS, "Key"),
    (abi.VerdictKey, "connect.c", names.MAP_VERDICT, "Key"),
    (abi.Verdict, "connect.c", names.MAP_VERDICT, "Leaf"),
    (abi.Direct, "sockops.c", names.MAP_DIRECT, "Leaf"),
    (abi.SvcKey, "connect.c", names.MAP_SVC, "Key"),
    (abi.Svc, "connect.c", names.MAP_SVC, "Leaf"),
    (abi.SvcSlot, "connect.c", names.MAP_SVC_EP, "Key"),
    (abi.EpState, "sockops.c", names.MAP_LB_EP, "Leaf"),
]


@pytest.fixture(scope="module")
def compiled():
    from bcc import BPF

    node = unique("abi")
    dp = Datapath(node, "/nonexistent")
    os.makedirs(dp.pins.maps)
    mods = {}
    try:
        for src in {c[1] for c in CASES}:
            mods[src] = BPF(
                src_file=os.path.join(bpf_source_dir(), src).encode(), cflags=dp._cflags()
            )
        yield mods
    finally:
        for m in mods.values():
            m.cleanup()
        shutil.rmtree(dp.pins.root, ignore_errors=True)


@pytest.mark.parametrize("mirror,src,mapname,part", CASES, ids=[c[0].__name__ for c in CASES])
def test_mirror_matches_bcc(compiled, mirror, src, mapname, part):
    derived = getattr(compiled[src][mapname.encode()], part)
    assert ctypes.sizeof(mirror) == ctypes.sizeof(derived)
    dfields = {
        f[0]: getattr(derived, f[0]).offset
        for f in derived._fields_
        if not f[0].startswith("__pad")
    }
    for fname, *_ in mirror._fields_:
        assert fname in dfields, f"{mirror.__name__}.{fname} is not in the C struct"
        assert getattr(mirror, fname).offset == dfields[fname], fname
    assert set(dfields) <= {f[0] for f in mirror._fields_}


def test_stat_enum_matches_c():
    with open(os.path.join(bpf_source_dir(), "include", "types.h")) as f:
        text = f.read()
    body = text[text.index("enum dabba_stat {") : text.index("DABBA_ST_MAX")]
    c_names = [
        line.strip().split()[0].rstrip(",").removeprefix("DABBA_ST_")
        for line in body.splitlines()[1:]
        if line.strip().startswith("DABBA_ST_")
    ]
    assert c_names == [s.name for s in abi.Stat]
    assert len(c_names) == abi.STAT_COUNT


def test_refusal_enum_and_constants_match_c():
    with open(os.path.join(bpf_source_dir(), "include", "types.h")) as f:
        text = f.read()
    body = text[text.index("enum dabba_refusal {") :]
    body = body[: body.index("};")]
    c = {
        line.split("=")[0].strip().removeprefix("DABBA_REFUSED_"): int(
            line.split("=")[1].split(",")[0]
        )
        for line in body.splitlines()
        if "DABBA_REFUSED_" in line
    }
    assert c == {r.name: r.value for r in abi.Refusal}
    for name, value in (
        ("DABBA_CFG_PASS_NON_TCP", abi.CFG_PASS_NON_TCP),
        ("DABBA_MTLS_STRICT", abi.MTLS_STRICT),
        ("DABBA_MTLS_PLAINTEXT", abi.MTLS_PLAINTEXT),
        ("TUN_SK_OUTBOUND", abi.TUN_SK_OUTBOUND),
        ("TUN_SK_HBONE", abi.TUN_SK_HBONE),
    ):
        line = next(x for x in text.splitlines() if x.split()[:2] == ["#define", name])
        assert int(line.split()[2], 0) == value, name


def test_flow_program_source_is_in_package():
    assert os.path.exists(os.path.join(bpf_source_dir(), FlowProgram.source))
