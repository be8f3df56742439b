"""The operator commands' way to the agent: HTTP over ``<state_dir>/agent.sock``.

Which agent: ``--state-dir``, else ``$DABBA_STATE_DIR``, else ``--node``
(``/run/dabba/<node>``, or ``<lab>/<node>`` for a lab's agent), else the
only agent running on this machine.
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import socket
import urllib.parse

from ..errors import DabbaError
from ..lab.lab import STATE_DIR as LAB_STATE_DIR
from .api import SOCKET

RUN_DIR = "/run/dabba"
INSTALL_DIR = "/var/lib/dabba"  # `dabba install systemd` and the DaemonSet: state_dir is here


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("agent", timeout=timeout)
        self.path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s


def _candidates() -> list[str]:
    return sorted(
        {
            os.path.dirname(p)
            for p in glob.glob(os.path.join(RUN_DIR, "*", SOCKET))
            + glob.glob(os.path.join(INSTALL_DIR, "*", SOCKET))
            + glob.glob(os.path.join(LAB_STATE_DIR, "*", "*", SOCKET))
        }
    )


def resolve_state_dir(state_dir: str | None, node: str | None) -> str:
    if state_dir:
        return state_dir
    if os.environ.get("DABBA_STATE_DIR"):
        return os.environ["DABBA_STATE_DIR"]
    if node:
        if "/" in node:
            lab, n = node.split("/", 1)
            return os.path.join(LAB_STATE_DIR, lab, n)
        direct = os.path.join(RUN_DIR, node)
        for d in (direct, os.path.join(INSTALL_DIR, node)):
            if os.path.exists(os.path.join(d, SOCKET)):
                return d
        if os.path.isdir(direct):
            return direct
        labs = sorted(glob.glob(os.path.join(LAB_STATE_DIR, "*", node)))
        if len(labs) == 1:
            return labs[0]
        if len(labs) > 1:
            names = ", ".join(f"{os.path.basename(os.path.dirname(x))}/{node}" for x in labs)
            raise DabbaError(f"--node {node} is in several labs: {names}", hint="--node LAB/NODE")
        return direct
    found = _candidates()
    if len(found) == 1:
        return found[0]
    if not found:
        if os.geteuid() != 0 and not os.access(RUN_DIR, os.R_OK | os.X_OK):
            raise DabbaError(
                "this command talks to the agent over a root-only socket",
                hint="run it with sudo",
            )
        raise DabbaError(
            "no agent is running on this machine (no agent.sock under "
            f"{RUN_DIR}/*/, {INSTALL_DIR}/*/ or {LAB_STATE_DIR}/*/*/)",
            hint="start one: `dabba agent run --config FILE`, `systemctl start dabba-agent`, "
            "or `dabba demo --keep`",
        )
    listed = ", ".join(found)
    raise DabbaError(
        f"several agents run on this machine: {listed}",
        hint="pick one with --node NAME (LAB/NODE for a lab) or --state-dir DIR",
    )


class AgentClient:
    def __init__(self, state_dir: str, timeout: float = 10.0):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, SOCKET)
        self.timeout = timeout

    def get(self, route: str, query: dict | None = None) -> object:
        q = {k: str(v) for k, v in (query or {}).items() if v not in (None, "", False)}
        target = route + ("?" + urllib.parse.urlencode(q) if q else "")
        conn = _UnixConnection(self.path, self.timeout)
        try:
            conn.request("GET", target)
            resp = conn.getresponse()
            body = resp.read()
        except FileNotFoundError:
            raise DabbaError(
                f"the agent is not running: {self.path} does not exist",
                hint="start it (`dabba agent run --config FILE` or `systemctl start dabba-agent`)",
            ) from None
        except PermissionError:
            raise DabbaError(
                f"permission denied on {self.path}: the agent's API is root-only",
                hint="run it with sudo",
            ) from None
        except ConnectionRefusedError:
            raise DabbaError(
                f"the agent is not running: nothing listens on {self.path} (a stale socket)",
                hint="start it (`dabba agent run --config FILE` or `systemctl start dabba-agent`)",
            ) from None
        except (TimeoutError, OSError) as e:
            raise DabbaError(f"the agent did not answer on {self.path}: {e}") from None
        finally:
            conn.close()
        if route == "/metrics":
            return body.decode()
        try:
            doc = json.loads(body)
        except ValueError:
            raise DabbaError(f"the agent sent a malformed answer to {target}") from None
        if resp.status != 200:
            err = doc.get("error", f"status {resp.status}") if isinstance(doc, dict) else doc
            raise DabbaError(
                str(err), hint=(doc.get("hint") or None) if isinstance(doc, dict) else None
            )
        return doc
