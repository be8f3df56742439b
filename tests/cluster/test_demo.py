"""`dabba demo` (README's first command after setup) runs end to end and cleans up."""

import os
import subprocess
import sys

from agent.lab import lab as labmod
from tests.conftest import unique


def test_demo_moves_exact_bytes_shows_flows_and_leaves_nothing_behind():
    name = unique("dm")
    try:
        r = subprocess.run(
            [sys.executable, "-m", "agent.cli", "demo", "--name", name],
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        labmod.down(name, quiet=True)  # only if the demo failed to
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    assert "sent 10,000,000 bytes, got back 123,456; n2-p2 received 10,000,000" in out
    assert out.count("bytes of body") == 4
    # the flow tables of both nodes: HBONE across, straight through the kernel on the node
    assert f"dabba flows --node {name}/n1" in out and f"dabba flows --node {name}/n2" in out
    rows = [line.split() for line in out.splitlines() if " allow " in line]
    paths = [(row[1], row[5]) for row in rows]  # AT, PATH
    assert paths.count(("src", "hbone")) == 4 and paths.count(("dst", "hbone")) == 4
    assert paths.count(("src", "direct")) == 1 and paths.count(("dst", "direct")) == 1
    assert "where to look next" in out and f"lab {name} removed" in out
    assert name not in [x.name for x in labmod.ls()]
    assert not os.path.exists(os.path.join(labmod.STATE_DIR, name))
