"""One-time join tokens: ``<id>.<secret>``; only a hash of the secret is stored.

A token names the node it is for, expires, and works once. State lives in
``<state>/tokens.json`` (atomic writes, 0600), so a restart loses nothing:
an unused token still works, a used one still does not.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time

from ..errors import DabbaError
from .store import atomic_write


class TokenError(DabbaError):
    """A token that cannot be used; the message says why (without echoing the secret)."""


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    """Tokens in a file shared by the running control plane and `dabba control token create`.

    Every change re-reads the file under an exclusive lock (``tokens.lock``),
    so neither writer can undo the other's change (a token marked used stays
    used).
    """

    def __init__(self, state_dir: str):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "tokens.json")
        self.lockpath = os.path.join(state_dir, "tokens.lock")
        self.tokens: dict[str, dict] = {}

    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(self.lockpath, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                with open(self.path) as f:
                    self.tokens = json.load(f)
            except FileNotFoundError:
                self.tokens = {}
            yield
        finally:
            os.close(fd)  # releases the lock

    def _save(self) -> None:
        atomic_write(self.path, json.dumps(self.tokens, indent=1).encode(), mode=0o600)

    def create(self, node: str, ttl_s: float) -> str:
        if not node or "/" in node:
            raise DabbaError(f"invalid node name {node!r}")
        if ttl_s <= 0:
            raise DabbaError("--ttl must be positive")
        tid, secret = secrets.token_hex(4), secrets.token_urlsafe(24)
        with self._locked():
            self.tokens[tid] = {
                "node": node,
                "hash": _hash(secret),
                "expires": time.time() + ttl_s,
                "created": time.time(),
                "used": None,
            }
            self._save()
        return f"{tid}.{secret}"

    def check(self, token: str, node: str) -> None:
        """Raise TokenError unless the token could be used for node now (nothing is marked)."""
        with self._locked():
            self._valid(token, node)

    def consume(self, token: str, node: str) -> None:
        """Use a token for node: raises TokenError unless it is valid, unused, unexpired and for node."""
        with self._locked():
            rec = self._valid(token, node)
            rec["used"] = time.time()
            self._save()

    def _valid(self, token: str, node: str) -> dict:
        tid, _, secret = token.partition(".")
        rec = self.tokens.get(tid)
        if rec is None or not secret or not hmac.compare_digest(rec["hash"], _hash(secret)):
            raise TokenError("unknown join token")
        if rec["used"] is not None:
            raise TokenError(f"join token {tid} was already used (at {time.ctime(rec['used'])})")
        if time.time() > rec["expires"]:
            raise TokenError(f"join token {tid} expired at {time.ctime(rec['expires'])}")
        if rec["node"] != node:
            raise TokenError(f"join token {tid} is for node {rec['node']!r}, not {node!r}")
        return rec

    def list(self) -> list[dict]:
        with self._locked():
            pass
        return [
            dict(id=k, **{x: v for x, v in r.items() if x != "hash"})
            for k, r in self.tokens.items()
        ]
