"""Test tiers: unit (no root); kernel and cluster (root, the real kernel).

Root tests skip when run without root on a workstation; under CI (CI=true)
a root test that would skip fails instead, as ztunnel's do.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time

import pytest

ROOT_TIERS = ("kernel", "cluster")
HELPERS = os.path.join(os.path.dirname(__file__), "helpers")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(f"{os.sep}{t}{os.sep}" in str(item.fspath) for t in ROOT_TIERS):
            item.add_marker(pytest.mark.root)


def pytest_runtest_setup(item):
    if item.get_closest_marker("root") and os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("root test without root under CI: privileged tests must run, not skip")
        pytest.skip("needs root (kernel/cluster tier)")


def unique(prefix: str = "t") -> str:
    """A name no other run uses (labs, pins, cgroups carry it)."""
    return f"{prefix}{secrets.token_hex(3)}"


def helper(name: str) -> list[str]:
    """argv running tests/helpers/<name>.py with this interpreter."""
    return [sys.executable, os.path.join(HELPERS, f"{name}.py")]


def cgroup_procs(cgroup: str) -> str:
    """The processes in cgroup (cgroup.procs), "" when it has none."""
    with open(os.path.join(cgroup, "cgroup.procs")) as f:
        return f.read().strip()


def popen_in_cgroup(cgroup: str, argv: list[str], netns: str | None = None, **kw):
    """argv in cgroup (joined before exec) and, with netns (a path), in that network namespace;
    stdout and stderr piped as text unless kw says otherwise."""

    def enter():
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    pre = ["nsenter", f"--net={netns}", "--"] if netns else []
    return subprocess.Popen([*pre, *argv], preexec_fn=enter, **kw)


class Container:
    """A cgroup below a lab pod's, as a container's cgroup is below its pod's in Kubernetes;
    popen() runs argv in it and in the pod's network namespace. remove() kills what it started
    and removes the cgroup."""

    def __init__(self, pod, name: str = "ctr"):
        self.pod, self.cgroup, self.procs = pod, os.path.join(pod.cgroup, name), []
        os.mkdir(self.cgroup)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        p = popen_in_cgroup(self.cgroup, argv, f"/run/netns/{self.pod.netns}", **kw)
        self.procs.append(p)
        return p

    def run(self, argv: list[str], timeout: float = 30) -> str:
        p = self.popen(argv)
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"{argv} in {self.cgroup} exited {p.returncode}: {err}"
        return out

    def remove(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(5)
        wait_for(lambda: not cgroup_procs(self.cgroup), 5, what=f"{self.cgroup} to empty")
        os.rmdir(self.cgroup)


def wait_for(pred, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_port(lab, target: str, ip: str, port: int, timeout: float = 10.0) -> None:
    """Wait until something listens on ip:port inside target's netns."""

    def listening():
        r = lab.run(target, ["ss", "-Hltn", f"src {ip}:{port}"], check=False)
        return r.returncode == 0 and r.stdout.strip() != ""

    wait_for(listening, timeout, what=f"a listener on {ip}:{port} in {target}")


def maps_dir(node) -> str:
    """Where a lab node's maps are pinned (the loader's own layout)."""
    from agent.bpf.loader import Pins

    return Pins(os.path.join("/sys/fs/bpf/dabba", node.bpf_node)).maps


def stub_tunnel(lab, procs, node, listen: str = "", *extra: str):
    """tests/helpers/stub_listener.py in node's namespace as its tunnel's outbound listener
    (default: the gateway's 15001), ready when this returns; extra: more of its flags."""
    stub = lab.popen(
        node.name,
        [*helper("stub_listener"), "--repo", REPO, "--maps", maps_dir(node),
         "--listen", listen or f"{node.gateway}:15001", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    procs.append(stub)
    read_json(stub, "listening")
    return stub


def http_server(lab, procs, pod, port: int):
    """python3 -m http.server in pod on pod.ip:port, ready when this returns."""
    p = lab.popen(
        pod.name,
        ["python3", "-m", "http.server", str(port), "--bind", pod.ip],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs.append(p)
    wait_port(lab, pod.name, pod.ip, port)
    return p


def tunnel_stats(lab, node: str) -> dict:
    """The node tunnel's /stats (admin port, the node's loopback), every worker summed."""
    r = lab.run(node, ["curl", "-s", "--max-time", "5", "http://127.0.0.1:15000/stats"])
    return json.loads(r.stdout)


def mesh_lab(prefix: str, nodes: int, pods_per_node: int, **mesh_kw):
    """A lab with a control plane and agents (mesh.up); yields (lab, processes); removed afterwards."""
    from agent.lab import lab as labmod
    from agent.lab import mesh, spec

    name = unique(prefix)
    L = labmod.up(name, spec.default_spec(nodes, pods_per_node))
    try:
        yield L, mesh.up(L, **mesh_kw)
    finally:
        labmod.down(name, quiet=True)


@pytest.fixture(scope="module")
def lab():
    """A 2-node lab with 2 pods per node, removed afterwards even on failure."""
    from agent.lab import lab as labmod
    from agent.lab import spec

    name = unique("k")
    L = labmod.up(name, spec.default_spec(2, 2))
    try:
        yield L
    finally:
        labmod.down(name, quiet=True)


@pytest.fixture(scope="module")
def datapaths(lab):
    """The datapath of every node of the lab, configured like the agent does."""
    from agent.bpf.control import DatapathControl
    from agent.bpf.loader import Datapath

    out = {}
    for node in lab.nodes:
        dp = Datapath(node.bpf_node, node.cgroup)
        dp.ensure()
        ctl = DatapathControl(dp)
        ctl.configure(node.gateway, 15001)
        ctl.set_tunnel_addrs([node.gateway])
        ctl.trust_tunnel_cgroup(node.system_cgroup)  # `lab.run(node)` acts as its tunnel
        out[node.name] = ctl
    yield out


@pytest.fixture
def procs():
    """Processes a test starts; killed (only these) at the end."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass


def read_json(proc, key: str, timeout: float = 30.0) -> dict:
    """Read JSON lines from proc.stdout until one has key (or fail with its stderr).

    Reads the pipe's fd directly and keeps unread lines on the proc, since a
    buffered reader would hide lines from select().
    """
    import json
    import select

    buf = getattr(proc, "_json_lines", None)
    if buf is None:
        buf = proc._json_lines = {"pending": b"", "lines": []}
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    eof = False
    while True:
        while buf["lines"]:
            line = buf["lines"].pop(0)
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if isinstance(d, dict) and key in d:
                return d
        if eof or time.monotonic() > deadline:
            break
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                eof = True
            buf["pending"] += chunk
            *lines, buf["pending"] = buf["pending"].split(b"\n")
            buf["lines"].extend(lines)
    err = ""
    if proc.stderr and proc.poll() is not None:
        err = proc.stderr.read()
    raise AssertionError(
        f"no {key!r} line from {proc.args!r}; exit={proc.poll()} stderr={err[-2000:]!s}"
    )


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_registry(lab, name: str, docs: list[dict]) -> None:
    """Replace the lab registry's file <name>.yaml with docs (none: remove it), atomically."""
    import yaml

    from agent.lab import mesh

    path = os.path.join(mesh.paths(lab)["registry"], f"{name}.yaml")
    if not docs:
        if os.path.exists(path):
            os.unlink(path)
        return
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump_all(docs, f, sort_keys=False)
    os.replace(path + ".tmp", path)


def spiffe(pod, trust_domain: str = "cluster.local") -> str:
    """A lab pod's SPIFFE ID."""
    return f"spiffe://{trust_domain}/ns/{pod.namespace}/sa/{pod.service_account}"


@contextlib.contextmanager
def control_server(tmp_path, registry: str):
    """A real control plane on loopback (ports from the kernel) with registry as its one
    registry file: (event loop, ControlServer), stopped afterwards."""
    import asyncio

    from agent.control.server import ControlConfig, ControlServer

    reg = tmp_path / "registry"
    reg.mkdir()
    (reg / "mesh.yaml").write_text(registry)
    cfg = ControlConfig(
        state_dir=str(tmp_path / "state"),
        registry_dir=str(reg),
        listen="127.0.0.1:0",
        join_listen="127.0.0.1:0",
        server_names=["127.0.0.1"],
        registry_poll_s=0.05,
    )
    loop = asyncio.new_event_loop()
    srv = ControlServer(cfg)
    loop.run_until_complete(srv.start())
    try:
        yield loop, srv
    finally:
        loop.run_until_complete(srv.stop())
        loop.close()
