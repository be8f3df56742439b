"""Certificates on the node: the node's own, and one per local workload.

Keys are made here and never leave (only CSRs do). Everything is kept on
disk (keys 0600) so a restarted agent, or one cut off from the control
plane, serves from what it has::

    <state>/identity/node-key.pem, node-chain.pem, bundle.pem
    <state>/certs/<namespace>/<name>/key.pem, chain.pem, svid.pem (both, for the tunnel)
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

from .. import certread
from ..control.store import atomic_write


@dataclass
class CertInfo:
    """A certificate the node holds."""

    spiffe_id: str
    serial: str
    issuer: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    renew_at: datetime.datetime  # half the lifetime, plus jitter

    @property
    def seconds_left(self) -> float:
        return (self.not_after - datetime.datetime.now(datetime.UTC)).total_seconds()

    def as_dict(self) -> dict:
        return {
            "spiffe_id": self.spiffe_id,
            "serial": self.serial,
            "issuer": self.issuer,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "renew_at": self.renew_at.isoformat(),
            "seconds_left": round(self.seconds_left, 1),
        }


def info_of(
    chain_pem: bytes,
    issued_at: datetime.datetime | None = None,
    jitter: float = 0.1,
    rng: random.Random | None = None,
) -> CertInfo:
    """Parse a chain; renew_at is half the lifetime plus up to jitter x lifetime (spreads renewals).

    The lifetime counts from issued_at (when the node got it), not from not_before: CAs
    backdate not_before for clock skew (ours by 60 s), which for short lifetimes would make a
    fresh certificate look half-spent already.
    """
    leaf = certread.load_pem_first(chain_pem)
    nb, na = leaf.not_before, leaf.not_after
    start = max(nb, min(issued_at, na)) if issued_at else nb
    life = na - start
    r = (rng or random).random()
    renew = start + life / 2 + life * jitter * r
    ids = leaf.spiffe_ids
    return CertInfo(
        ids[0] if ids else "",
        format(leaf.serial, "x"),
        leaf.issuer,
        nb,
        na,
        renew,
    )


class CertStore:
    """The node's certificate files."""

    def __init__(self, state_dir: str):
        self.root = state_dir
        self.identity = os.path.join(state_dir, "identity")
        self.certs = os.path.join(state_dir, "certs")

    # node identity
    def node_paths(self) -> tuple[str, str, str]:
        return (
            os.path.join(self.identity, "node-key.pem"),
            os.path.join(self.identity, "node-chain.pem"),
            os.path.join(self.identity, "bundle.pem"),
        )

    def has_node_identity(self) -> bool:
        return all(os.path.exists(p) for p in self.node_paths())

    def save_node(self, key_pem: bytes, chain_pem: bytes, bundle_pem: bytes) -> None:
        k, c, b = self.node_paths()
        os.makedirs(self.identity, mode=0o700, exist_ok=True)
        atomic_write(k, key_pem, mode=0o600)
        atomic_write(c, chain_pem)
        atomic_write(b, bundle_pem)

    def load_node(self) -> tuple[bytes, bytes, bytes]:
        return tuple(open(p, "rb").read() for p in self.node_paths())  # type: ignore[return-value]

    def save_bundle(self, bundle_pem: bytes) -> None:
        atomic_write(self.node_paths()[2], bundle_pem)

    # workloads
    def workload_dir(self, namespace: str, name: str) -> str:
        return os.path.join(self.certs, namespace, name)

    def save_workload(self, namespace: str, name: str, key_pem: bytes, chain_pem: bytes) -> None:
        d = self.workload_dir(namespace, name)
        os.makedirs(d, mode=0o700, exist_ok=True)
        atomic_write(os.path.join(d, "key.pem"), key_pem, mode=0o600)
        atomic_write(os.path.join(d, "chain.pem"), chain_pem)
        # key and chain in one file, replaced in one step: what the tunnel loads, so it
        # never sees a new key with an old certificate
        atomic_write(os.path.join(d, "svid.pem"), key_pem + chain_pem, mode=0o600)

    def issued_at(self, namespace: str, name: str) -> datetime.datetime | None:
        """When the workload's certificate was written (its receipt time, across restarts)."""
        try:
            st = os.stat(os.path.join(self.workload_dir(namespace, name), "chain.pem"))
        except FileNotFoundError:
            return None
        return datetime.datetime.fromtimestamp(st.st_mtime, datetime.UTC)

    def load_workload(self, namespace: str, name: str) -> tuple[bytes, bytes] | None:
        d = self.workload_dir(namespace, name)
        try:
            with (
                open(os.path.join(d, "key.pem"), "rb") as k,
                open(os.path.join(d, "chain.pem"), "rb") as c,
            ):
                return k.read(), c.read()
        except FileNotFoundError:
            return None

    def remove_workload(self, namespace: str, name: str) -> None:
        import shutil

        shutil.rmtree(self.workload_dir(namespace, name), ignore_errors=True)
