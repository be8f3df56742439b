"""The agent's link to the control plane: join, watch, certificates, renewal, offline operation.

- Joins once with the one-time token (then authenticates with the node
  certificate only), retrying with backoff while the control plane is
  unreachable.
- Keeps the last good snapshot on disk and applies it at start, so a node
  cut off from the control plane goes on serving what it knew.
- Fetches a certificate for every local workload before the workload's
  traffic is captured (enrolment waits for it), and renews at half the
  lifetime plus jitter; a trust-bundle change (root rotation) re-issues all.
- Reconnects with exponential backoff; reports how stale its state is.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import random
import time
from collections.abc import Callable

from .. import log
from ..control import validate, wire
from ..control.store import atomic_write
from ..errors import DabbaError
from ..spiffe import trust_domain
from . import keygen
from .control_client import describe, join
from .identity import CertInfo, CertStore, info_of
from .rpc import Channel, ControlStub, RpcError

_log = log.get("sync")

BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0


def workload_error(w: wire.Workload) -> str | None:
    """Why a snapshot's workload cannot be given a certificate here, or None."""
    err = validate.namespace_error(w.namespace) or validate.name_error(w.name)
    if err:
        return err
    td = trust_domain(w.spiffe_id)
    if validate.workload_identity(w.spiffe_id, td) != (w.namespace, w.service_account):
        return (
            f"identity {w.spiffe_id!r:.120} is not spiffe://<td>/ns/{w.namespace}/sa/<its account>"
        )
    return None


class ControlSync:
    """Runs in the agent's event loop; calls apply(snapshot, certs) whenever either changes."""

    def __init__(
        self,
        node: str,
        address: str,
        control_addr: str,
        join_addr: str,
        ca_file: str,
        token_file: str,
        state_dir: str,
        apply: Callable[[wire.Snapshot, dict[str, CertInfo]], None],
        before_write: Callable[[wire.Snapshot, dict[str, CertInfo]], None] | None = None,
    ):
        # before_write(snapshot, certs): what must be in force before the tunnel reads the new
        # snapshot (the kernel's same-node verdicts: no window where the tunnel holds a new
        # policy and the kernel the old one)
        self.before_write = before_write
        self.node, self.address = node, address
        self.control_addr, self.join_addr = control_addr, join_addr
        self.ca_file, self.token_file = ca_file, token_file
        self.store = CertStore(state_dir)
        self.snapshot_path = os.path.join(state_dir, "snapshot.pb")
        self.apply = apply
        self.snapshot: wire.Snapshot | None = None
        self.certs: dict[str, CertInfo] = {}  # namespace/name -> info
        self.connected = False
        self.last_contact: float | None = None
        self.renewals = 0
        self.failures = 0
        self.last_error: str | None = None
        self._stop = asyncio.Event()
        self._bundle: bytes = b""
        self._signing_root = ""
        self.node_cert: CertInfo | None = None
        self.node_renewals = 0

    # ---- status ----------------------------------------------------------------------------
    def status(self) -> dict:
        now = time.time()
        return {
            "connected": self.connected,
            "address": self.control_addr,
            "config_version": self.snapshot.version if self.snapshot else 0,
            "last_contact": self.last_contact,
            "staleness_s": round(now - self.last_contact, 1) if self.last_contact else None,
            "renewals": self.renewals,
            "node_cert": self.node_cert.as_dict() if self.node_cert else None,
            "node_renewals": self.node_renewals,
            "failures": self.failures,
            "last_error": self.last_error,
            "certs": {k: v.as_dict() for k, v in self.certs.items()},
        }

    # ---- start-up ------------------------------------------------------------------------------
    def load_cached(self) -> None:
        """The last good snapshot and certificates from disk (used until the control plane answers)."""
        try:
            with open(self.snapshot_path, "rb") as f:
                self.snapshot = wire.Snapshot.FromString(f.read())
        except FileNotFoundError:
            return
        except Exception as e:
            _log.warning(f"cached snapshot {self.snapshot_path} is unreadable, ignoring it: {e}")
            return
        for w in self._local(self.snapshot):
            got = self.store.load_workload(w.namespace, w.name)
            if got:
                self.certs[f"{w.namespace}/{w.name}"] = info_of(
                    got[1], self.store.issued_at(w.namespace, w.name)
                )
        if self.store.has_node_identity():
            self._bundle = self.store.load_node()[2]
        self._signing_root = (
            self.snapshot.signing_root
        )  # a rotation while we were away still re-issues
        _log.info(
            "serving from the cached snapshot until the control plane answers",
            fields={"version": self.snapshot.version, "certs": len(self.certs)},
        )
        self.apply(self.snapshot, dict(self.certs))

    def _load_node_cert(self) -> None:
        chain = self.store.load_node()[1]
        try:
            issued = datetime.datetime.fromtimestamp(
                os.stat(self.store.node_paths()[1]).st_mtime, datetime.UTC
            )
        except FileNotFoundError:
            issued = None
        self.node_cert = info_of(chain, issued)

    async def ensure_joined(self) -> None:
        if self.store.has_node_identity():
            self._load_node_cert()
            return
        try:
            with open(self.ca_file, "rb") as f:
                ca_pem = f.read()
        except OSError as e:
            raise DabbaError(
                f"cannot read the control plane's CA file {self.ca_file}: {e.strerror}"
            ) from None
        # a systemd credential (LoadCredential=join-token:...) comes first, then the file
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        token_path = self.token_file
        if creds and os.path.exists(os.path.join(creds, "join-token")):
            token_path = os.path.join(creds, "join-token")
        try:
            with open(token_path) as f:
                token = f.read().strip()
        except OSError as e:
            raise DabbaError(
                f"this node has not joined and its join token {token_path} is unreadable: "
                f"{e.strerror}",
                hint=f"create one with `dabba control token create --node {self.node}`",
            ) from None
        delay = BACKOFF_MIN
        while True:
            try:
                key, cert = await join(self.join_addr, ca_pem, self.node, token, self.address)
                break
            except DabbaError as e:
                if "unreachable" not in str(e):
                    raise  # a refused token does not get better by retrying
                self.last_error = str(e)
                _log.warning(f"join: {e}; retrying in {delay:.1f}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        self.store.save_node(key, cert.cert_chain_pem, cert.trust_bundle_pem)
        self._bundle = cert.trust_bundle_pem
        self._load_node_cert()
        _log.info("joined the mesh", fields={"node": self.node, "trust_domain": cert.trust_domain})

    # ---- the loop ---------------------------------------------------------------------------------
    async def run(self) -> None:
        self.load_cached()
        await self.ensure_joined()
        delay = BACKOFF_MIN
        renew = asyncio.ensure_future(self._renew_loop())
        try:
            while not self._stop.is_set():
                try:
                    if not await self._watch_until_stopped():
                        return
                    delay = BACKOFF_MIN
                except (RpcError, DabbaError, OSError) as e:
                    msg = str(describe(e, self.control_addr)) if isinstance(e, RpcError) else str(e)
                    if self.connected or msg != self.last_error:
                        _log.warning(
                            f"control plane stream lost: {msg}; reconnecting in {delay:.1f}s",
                            fields={"staleness_s": self.status()["staleness_s"]},
                        )
                    self.connected, self.last_error = False, msg
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, BACKOFF_MAX)
        finally:
            renew.cancel()

    def stop(self) -> None:
        self._stop.set()

    async def _watch_until_stopped(self) -> bool:
        """Follow the control plane's stream; False once stop() is called (the stream is
        cancelled: it never ends by itself)."""
        watch = asyncio.ensure_future(self._watch())
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({watch, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not watch.done():
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            return False
        watch.result()  # the stream ended or failed: raise to reconnect
        return True

    def _channel(self):
        key, chain, bundle = self.store.node_paths()
        with open(bundle, "rb") as f:
            return Channel(self.control_addr, f.read(), chain, key)

    async def _watch(self) -> None:
        async with self._channel() as ch:
            stub = ControlStub(ch)
            have = self.snapshot.version if self.snapshot else 0
            async for snap in stub.Watch(wire.WatchRequest(have_version=have)):
                self.connected, self.last_error, self.last_contact = True, None, time.time()
                await self._on_snapshot(stub, snap)

    async def _on_snapshot(self, stub, snap: wire.Snapshot) -> None:
        # re-issue when the root that signs changes (phase 2 of a rotation); a bundle that
        # only gained a root (phase 1) needs nothing but trust
        signer_changed = bool(self._signing_root) and snap.signing_root != self._signing_root
        self._signing_root = snap.signing_root
        if snap.trust_bundle_pem:
            self.store.save_bundle(snap.trust_bundle_pem)
            self._bundle = snap.trust_bundle_pem
        if self.before_write is not None:
            try:
                self.before_write(snap, dict(self.certs))
            except Exception as e:  # the snapshot still goes to the tunnel
                _log.error(f"before the snapshot went to the tunnel: {e}")
        atomic_write(self.snapshot_path, snap.SerializeToString())
        self.snapshot = snap
        local = {f"{w.namespace}/{w.name}": w for w in self._local(snap)}
        for key in set(self.certs) - set(local):
            ns, name = key.split("/", 1)
            self.store.remove_workload(ns, name)
            del self.certs[key]
        todo = [
            (w, "root rotation" if signer_changed and info else "new workload")
            for key, w in local.items()
            if (info := self.certs.get(key)) is None
            or signer_changed
            or info.spiffe_id != w.spiffe_id
        ]
        await self._sign(stub, todo)
        if signer_changed and self.node_cert is not None:
            # the node's own certificate too: once the old root is retired, one it signed
            # would lock this node out of the control plane (no renewal without a valid one)
            await self._renew_node(stub)
        _log.info(
            "applied snapshot",
            fields={
                "version": snap.version,
                "workloads": len(local),
                "policies": len(snap.policies),
            },
        )
        self.apply(snap, dict(self.certs))

    def _local(self, snap: wire.Snapshot):
        """This node's workloads of the snapshot, each checked before its names become folders
        and its identity a CSR: a namespace, name or identity that is not what Kubernetes and
        SPIFFE allow is left out (no certificate: held, its connections refused), logged."""
        out = []
        for w in snap.workloads:
            if w.node != self.node:
                continue
            err = workload_error(w)
            if err:
                _log.error(
                    "workload in the snapshot refused: no certificate for it",
                    fields={"workload": f"{w.namespace!r:.70}/{w.name!r:.70}", "error": err},
                )
                continue
            out.append(w)
        return out

    async def _sign(self, stub, todo: list[tuple[wire.Workload, str]]) -> None:
        """New keys and certificates for (workload, why): the keys made in one batch."""
        pairs = await keygen.csrs([w.spiffe_id for w, _ in todo])
        for (w, why), (key_pem, csr) in zip(todo, pairs, strict=True):
            resp = await stub.SignWorkload(
                wire.SignWorkloadRequest(namespace=w.namespace, name=w.name, csr_pem=csr),
                timeout=10,
            )
            self.store.save_workload(w.namespace, w.name, key_pem, resp.cert_chain_pem)
            info = info_of(resp.cert_chain_pem, datetime.datetime.now(datetime.UTC))
            old = self.certs.get(f"{w.namespace}/{w.name}")
            self.certs[f"{w.namespace}/{w.name}"] = info
            if old:
                self.renewals += 1
            _log.info(
                "certificate issued",
                fields={
                    "identity": info.spiffe_id,
                    "serial": info.serial,
                    "why": why,
                    "not_after": info.not_after.isoformat(),
                },
            )

    async def _renew_node(self, stub) -> None:
        """A new node certificate (new key) before the current one expires."""
        [(key_pem, csr)] = await keygen.csrs([self.node_cert.spiffe_id])
        resp = await stub.RenewNode(wire.RenewNodeRequest(csr_pem=csr), timeout=10)
        self.store.save_node(key_pem, resp.cert_chain_pem, resp.trust_bundle_pem)
        self.node_cert = info_of(resp.cert_chain_pem, datetime.datetime.now(datetime.UTC))
        self.node_renewals += 1
        _log.info(
            "node certificate renewed",
            fields={
                "serial": self.node_cert.serial,
                "not_after": self.node_cert.not_after.isoformat(),
            },
        )

    async def _renew_loop(self) -> None:
        """Renew certificates due (half-life + jitter); on failure keep the old one and retry."""
        while True:
            await asyncio.sleep(0.5)
            if not self.snapshot or not self.connected:
                continue
            now = datetime.datetime.now(datetime.UTC)
            due = [
                w
                for w in self._local(self.snapshot)
                if (i := self.certs.get(f"{w.namespace}/{w.name}")) is not None
                and now >= i.renew_at
            ]
            node_due = self.node_cert is not None and now >= self.node_cert.renew_at
            if not due and not node_due:
                continue
            try:
                async with self._channel() as ch:
                    stub = ControlStub(ch)
                    await self._sign(stub, [(w, "renewal") for w in due])
                    if node_due:
                        await self._renew_node(stub)
                if due:
                    self.apply(self.snapshot, dict(self.certs))
            except (RpcError, DabbaError, OSError) as e:
                self.failures += 1
                _log.warning(f"renewal failed, keeping the current certificates: {e}")
                await asyncio.sleep(min(BACKOFF_MAX, random.uniform(1, 3)))
