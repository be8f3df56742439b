"""Bad input: clear errors naming what and where, and nothing left behind."""

import os
import subprocess
import sys

import pytest

from agent.bpf.control import DatapathControl, cgroup_id
from agent.bpf.loader import Datapath
from agent.errors import DabbaError
from agent.lab import lab as labmod
from agent.lab import spec
from tests.conftest import unique


def _netns():
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


def test_unknown_cgroup_path_is_refused_by_name(lab, datapaths):
    ctl = datapaths["n1"]
    before = ctl.workloads()
    bogus = os.path.join(lab.node("n1").cgroup, "no-such-pod")
    with pytest.raises(DabbaError, match=f"unknown cgroup path {bogus}"):
        ctl.enrol(bogus, 99, 1)
    with pytest.raises(DabbaError, match="not a cgroup v2 directory"):
        cgroup_id("/tmp")
    assert ctl.workloads() == before


def test_lab_name_clash_is_refused_and_leaves_the_first_lab_intact(lab):
    ns_before = _netns()
    with pytest.raises(DabbaError, match=f"a lab named '{lab.name}' already exists"):
        labmod.up(lab.name, spec.default_spec(1, 1))
    assert _netns() == ns_before
    assert labmod.load(lab.name).pods == lab.pods
    assert lab.run("n1-p1", ["true"]).returncode == 0


def test_invalid_lab_name_creates_nothing():
    ns_before = _netns()
    with pytest.raises(DabbaError, match="invalid lab name"):
        labmod.up("Bad_Name", spec.default_spec(1, 1))
    assert _netns() == ns_before


def test_missing_bpffs_is_a_clear_error_and_creates_nothing(tmp_path, lab):
    dp = Datapath(unique("nb"), lab.node("n1").cgroup, bpffs=str(tmp_path))
    with pytest.raises(DabbaError, match="is not on a BPF filesystem"):
        dp.ensure()
    assert list(tmp_path.iterdir()) == []


def test_cgroup_v1_is_a_clear_error_and_creates_nothing():
    node = unique("nv")
    dp = Datapath(node, "/sys/fs/cgroup/memory")  # a v1 hierarchy on this hybrid host
    if not os.path.isdir("/sys/fs/cgroup/memory"):
        dp = Datapath(node, "/proc")
    with pytest.raises(DabbaError, match="is not a cgroup v2 directory"):
        dp.ensure()
    assert not os.path.exists(dp.pins.root)


def test_failed_load_removes_what_it_created(lab, monkeypatch):
    """A program that fails to load (here: a source that does not compile) leaves no pins."""
    from agent.bpf import loader

    node = unique("nf")
    dp = Datapath(node, lab.node("n1").cgroup)
    monkeypatch.setattr(loader.GuardProgram, "source", "does-not-exist.c")
    with pytest.raises(DabbaError, match="loading cgroup_skb/ingress program dabba_guard"):
        dp.ensure()
    assert not os.path.exists(dp.pins.root)
    # and nothing stayed attached to the node cgroup
    st = Datapath(lab.node("n1").bpf_node, lab.node("n1").cgroup).status()
    assert all(p.attached == 1 for p in st.programs if not p.elsewhere)


def test_cli_errors_are_one_line_with_hint(tmp_path):
    bad = tmp_path / "agent.yaml"
    bad.write_text("node: n1\ncgroup: relative/path\ntunnel: {address: 10.0.0.1}\n")
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "agent", "run", "--config", str(bad), "--check"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert f"error: {bad}:2: cgroup must be an absolute path" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "bpf", "status", "--node", "no-such-node"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "has no pinned datapath" in r.stderr and "hint:" in r.stderr


def test_workload_enrolment_of_unknown_cgroup_via_agent_check(lab, tmp_path):
    import yaml

    cfg = labmod.agent_config(lab, "n1")
    cfg["workloads"][0]["cgroup"] = "/sys/fs/cgroup/unified/nope-" + unique()
    p = tmp_path / "a.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "agent", "run", "--config", str(p), "--check"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "unknown cgroup path" in r.stderr


def test_control_rejects_bad_exclusion(datapaths):
    ctl: DatapathControl = datapaths["n1"]
    with pytest.raises(DabbaError, match="'10.0.0.0/33' is not an IPv4 or IPv6 CIDR"):
        ctl.set_exclusions(["10.0.0.0/33"], [])


def test_stale_pins_of_a_crashed_lab_are_refused_then_removed_by_down():
    name = unique("cs")
    stale = os.path.join("/sys/fs/bpf/dabba", f"{name}_n1")
    os.makedirs(os.path.join(stale, "maps"))
    try:
        ns_before = _netns()
        with pytest.raises(DabbaError, match=f"pinned datapaths of an earlier lab named '{name}'"):
            labmod.up(name, spec.default_spec(1, 1))
        assert _netns() == ns_before
        assert labmod.down(name, quiet=True) is True
        assert not os.path.exists(stale)
    finally:
        labmod.down(name, quiet=True)  # also if up() wrongly succeeded


def test_agent_check_names_a_missing_ca_file_and_join_token(lab, tmp_path):
    import yaml

    cfg = labmod.agent_config(lab, "n1")
    cfg["state_dir"] = str(tmp_path / "state")
    cfg["control"] = {
        "address": "10.10.0.1:15012",
        "join_address": "10.10.0.1:15013",
        "ca_file": str(tmp_path / "missing-ca.pem"),
        "token_file": str(tmp_path / "missing-token"),
        "node_address": "10.10.0.11",
    }
    p = tmp_path / "a.yaml"
    p.write_text(yaml.safe_dump(cfg))
    run = [sys.executable, "-m", "agent.cli", "agent", "run", "--config", str(p), "--check"]
    r = subprocess.run(run, capture_output=True, text=True)
    assert (
        r.returncode == 1
        and f"control.ca_file {tmp_path / 'missing-ca.pem'} is not readable" in r.stderr
    )
    (tmp_path / "missing-ca.pem").write_text("x")
    r = subprocess.run(run, capture_output=True, text=True)
    assert r.returncode == 1 and "has not joined and control.token_file" in r.stderr
    assert "dabba control token create --node n1" in r.stderr
    (tmp_path / "missing-token").write_text("t")
    r = subprocess.run(run, capture_output=True, text=True)
    assert r.returncode == 0 and "will join 10.10.0.1:15013" in r.stdout


def test_a_program_the_verifier_refuses_is_named_with_the_verifiers_reason(
    lab, tmp_path, monkeypatch
):
    """The real verifier refuses a program that reads past its context; the error carries the
    verifier's own reason, not only the syscall's "Invalid argument"."""
    from agent.bpf import loader

    src = tmp_path / "bad_guard.c"
    src.write_text(
        "#include <uapi/linux/bpf.h>\n"
        "int dabba_guard(struct __sk_buff *skb)\n"
        "{\n"
        "\treturn *(volatile u32 *)((char *)skb + 4096);\n"
        "}\n"
    )
    node = unique("nv")
    dp = Datapath(node, lab.node("n1").cgroup)
    monkeypatch.setattr(loader.GuardProgram, "source", str(src))  # absolute: joined as is
    with pytest.raises(DabbaError) as e:
        dp.ensure()
    msg = str(e.value)
    assert "loading cgroup_skb/ingress program dabba_guard" in msg and str(src) in msg
    assert "the verifier said: invalid bpf_context access off=4096" in msg, msg
    assert not os.path.exists(dp.pins.root)


def test_a_datapath_pinned_by_another_version_is_refused_not_adopted(lab):
    """Before: the agent adopted whatever was pinned. After IPv6 was meshed (16-byte
    addresses), a node loaded by the previous version has 12-byte 4-tuples in dabba_cap_tp: the
    tunnel's lookups would have missed every capture record, and the agent's writes failed or
    corrupted the maps. Now the agent refuses to adopt it and says how to reload."""
    from agent.bpf import names
    from agent.bpf import sys as bpfsys

    node = unique("nl")
    dp = Datapath(node, lab.node("n1").cgroup)
    try:
        os.makedirs(dp.pins.maps)
        # dabba_cap_tp as the version before IPv6 pinned it: key 12, value 24 (hash = type 1)
        fd = bpfsys.map_create(1, 12, 24, 16, names.MAP_CAP_TUPLE)
        try:
            bpfsys.obj_pin(fd, dp.pins.map_path(names.MAP_CAP_TUPLE))
        finally:
            os.close(fd)
        with pytest.raises(DabbaError) as e:
            dp.ensure()
        msg = str(e.value)
        assert "map dabba_cap_tp has 12-byte keys and 24-byte values" in msg, msg
        assert "this version's have 36 and 56; refusing to adopt it" in msg, msg
        assert f"dabba bpf unload --node {node}" in e.value.hint
        assert not os.path.exists(dp.pins.progs)  # nothing loaded or attached over it
    finally:
        dp.remove()
