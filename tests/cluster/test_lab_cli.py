"""The lab through its CLI, as users drive it: up, exec, ls, down; several labs at once."""

import json
import os
import subprocess
import sys

from tests.conftest import unique

DABBA = [sys.executable, "-m", "agent.cli"]


def dabba(*args, check=True):
    r = subprocess.run([*DABBA, *args], capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def _root_links():
    return set(os.listdir("/sys/class/net"))


def test_two_labs_at_once_exec_and_clean_down(tmp_path):
    a, b = unique("ca"), unique("cb")
    links = _root_links()
    spec = tmp_path / "c.yaml"
    spec.write_text(
        "nodes: 2\npods:\n  - {name: client, node: n1, namespace: shop, serviceAccount: buyer}\n"
        "  - {name: web, node: n2, labels: {app: web}}\n"
    )
    try:
        out = json.loads(dabba("lab", "up", "--name", a, "-f", str(spec), "-o", "json").stdout)
        dabba("lab", "up", "--name", b, "--nodes", "1", "--pods-per-node", "1")
        assert {p["name"] for p in out["pods"]} == {"client", "web"}
        web = next(p for p in out["pods"] if p["name"] == "web")
        # the same addresses in both labs, isolated from each other and from the host
        r = subprocess.run(
            [
                *DABBA,
                "lab",
                "exec",
                a,
                "client",
                "--",
                "python3",
                "-c",
                f"import socket; s=socket.socket(); s.settimeout(2); print(s.connect_ex(('{web['ip']}', 1)))",
            ],
            capture_output=True,
            text=True,
        )
        assert r.stdout.strip() == "111"  # ECONNREFUSED: routed to the pod, nothing listens
        r = subprocess.run(
            [*DABBA, "lab", "exec", a, "client", "--", "cat", "/proc/self/cgroup"],
            capture_output=True,
            text=True,
        )
        assert r.stdout.strip().endswith(f"/dabba.{a}/n1/client")
        names = [x["name"] for x in json.loads(dabba("lab", "ls", "-o", "json").stdout)]
        assert a in names and b in names
        assert _root_links() == links  # nothing created in the root namespace
        r = dabba("lab", "exec", a, "nope", "--", "true", check=False)
        assert r.returncode == 1 and f"lab {a} has no pod or node 'nope'" in r.stderr
    finally:
        dabba("lab", "down", a)
        dabba("lab", "down", b)
    assert "nothing to remove" in dabba("lab", "down", a).stdout
    assert not [n for n in os.listdir("/run/netns") if n.startswith((f"dl.{a}", f"dl.{b}"))]
    assert not os.path.exists(f"/sys/fs/cgroup/unified/dabba.{a}")


def test_down_after_a_crash_that_lost_the_state_file():
    from agent.lab import lab as labmod
    from agent.lab import spec

    name = unique("cc")
    L = labmod.up(name, spec.default_spec(1, 2))
    sleeper = L.popen("n1-p1", ["sleep", "300"])
    os.unlink(labmod.state_path(name))  # the crash
    dabba("lab", "down", name)
    assert sleeper.wait(10) != 0  # killed with its cgroup
    assert not [n for n in os.listdir("/run/netns") if n.startswith(f"dl.{name}")]
    assert not os.path.exists(L.cgroup)
