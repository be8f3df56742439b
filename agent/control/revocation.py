"""Revoked nodes: ``<state>/revoked.json``, written by ``dabba control node revoke``.

A revoked node is refused everywhere its certificates would let it in: the control plane's
RPCs (Watch, SignWorkload, RenewNode) and joins, and every node's HBONE listener and pool,
which get the serials of every unexpired certificate issued to it (Snapshot.revoked_serials,
from the control plane's record of what it issued). Revocation lasts until
``dabba control node unrevoke``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time

from ..errors import DabbaError
from . import validate
from .store import atomic_write, load_records


class RevokedNodes:
    """The revoked nodes of a control plane's state folder (shared with the CLI, locked)."""

    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, "revoked.json")
        self.lockpath = os.path.join(state_dir, "revoked.lock")
        self.nodes: dict[str, dict] = {}
        self.stamp = None
        self.reload()

    def _mtime(self):
        try:
            return os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return None

    def reload(self) -> bool:
        """Read the file again if it changed; True when it did."""
        stamp = self._mtime()
        if stamp == self.stamp:
            return False
        try:
            with open(self.path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            doc = {}
        except ValueError as e:
            raise DabbaError(f"{self.path}: not valid JSON ({e}); fix or remove it") from None
        self.nodes, self.stamp = dict(doc), stamp
        return True

    @contextlib.contextmanager
    def _locked(self):
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        fd = os.open(self.lockpath, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.stamp = None
            self.reload()
            yield
            atomic_write(self.path, json.dumps(self.nodes, indent=1).encode(), mode=0o600)
        finally:
            os.close(fd)

    def revoke(self, node: str) -> bool:
        """Revoke node; False if it was revoked already."""
        err = validate.node_error(node)
        if err:
            raise DabbaError(f"cannot revoke: {err}")
        with self._locked():
            if node in self.nodes:
                return False
            self.nodes[node] = {"at": time.time()}
        return True

    def unrevoke(self, node: str) -> bool:
        with self._locked():
            return self.nodes.pop(node, None) is not None

    def __contains__(self, node: str) -> bool:
        return node in self.nodes


def revoked_serials(serials_log: str, revoked: RevokedNodes, now: float | None = None) -> list[str]:
    """The serials (hex) of every certificate issued to a revoked node that has not expired."""
    if not revoked.nodes:
        return []
    now = time.time() if now is None else now
    return sorted(
        {
            r["serial"]
            for r in load_records(serials_log)
            if r.get("node") in revoked.nodes and r.get("not_after", 0) > now
        }
    )
