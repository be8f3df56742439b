"""The node agent: owns the node's datapath and keeps it in line with its config.

What it does, in order:
1. checks the kernel features and paths it needs;
2. loads the eBPF programs, or adopts them when they are pinned already
   (a restart compiles nothing and attaches nothing twice);
3. writes the runtime config (tunnel address, exclusions, tunnel addresses
   for STRICT workloads) and enrols the node's workloads, removing
   enrolments of workloads no longer configured;
4. drains closed-flow records from the ring buffer, keeping the most recent
   ``keep_closed`` for operators, and writes a status file.

On SIGTERM or SIGINT it exits and leaves every pin in place: capture,
accounting and the guard go on in the kernel while it is down.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

from .. import heap, log, systemd
from ..bpf import abi, features, names
from ..bpf.control import DatapathControl, cgroup_id
from ..bpf.flows import FlowRecord, FlowSource
from ..bpf.loader import Datapath
from ..bpf.sys import Map
from ..control.model import plaintext_ports
from ..control.store import ENROLLED_FILE, atomic_write, private_dir
from ..errors import DabbaError
from . import addresses, pods
from .closedlog import ClosedLog
from .config import AgentConfig
from .flowtable import FlowTable
from .samenode import SameNode
from .services import KernelServices

_log = log.get("agent")
# after a small batch of closed flows, how long the ring gathers the next (at 30,000 closes/s,
# 300 records of the ring's 6,500 at the default 256 pages); after a big one, none: a burst (1,000
# connections ending at once) is drained at once
DRAIN_BATCH_S = 0.01
DRAIN_BATCH_MAX = 256

HBONE_PORT = 15008


def _log_task_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.error(f"{task.get_coro().__qualname__} failed: {task.exception()!r}")


class Agent:
    """One node's agent."""

    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.dp = Datapath(cfg.pin_name, cfg.cgroup, cfg.bpffs, cfg.maps)
        self.ctl = DatapathControl(self.dp)
        self.closed = ClosedLog(cfg.state_dir, cfg.keep_closed)  # closed.jsonl
        self.stop = threading.Event()
        self.started = time.time()
        self.load_reports = []
        self.packet_sockets = (False, "not probed yet")  # (refused in the kernel, how / why not)
        self.workload_ids: dict[int, str] = {}  # cgroup id -> namespace/name
        self.sync = None
        self.tunnel_proc = None
        self.tunnel_restarts = 0
        self.tunnel_upgrades = 0
        self.upgrade_tunnel = asyncio.Event()  # set by SIGHUP: start a successor, hand over
        self._draining: list = []  # old tunnels still draining after an upgrade
        self._tunnel_was_ready = False
        self._last = None
        self._pods: dict[str, tuple[str, str]] = {}  # the last snapshot's pods: (cgroup, netns)
        self._waypoint_pods: set[str] = set()  # waypoints' pods here: not captured
        self._by_key: dict[str, object] = {}  # namespace/name -> workload (snapshot or config)
        self._svc_by_vip: dict[str, object] = {}  # the snapshot's services by VIP
        self._by_ip: dict[str, object] = {}
        self._netns: dict[str, str] = {}  # namespace/name -> its network namespace (a path)
        self.same_node = SameNode(self)
        self.kernel_services = KernelServices(self)
        self.table = FlowTable(
            cfg.keep_closed,
            lambda cg: self._by_key.get(self.workload_ids.get(cg, "")),
            self._by_ip.get,
            lambda: {cfg.tunnel.address, cfg.tunnel.address6, *cfg.tunnel_addresses} - {""},
            self.same_node.rules.get,
            lambda ip: self._svc_by_vip.get(ip),
        )
        self._flow_map: Map | None = None
        self.api = None
        self._drain_beat = time.monotonic()  # the flow thread's last turn (for the watchdog)
        self._drain_thread: threading.Thread | None = None
        self._node_addrs: list[str] = []

    def check(self) -> list[str]:
        """What --check verifies without changing anything; returns notes for the operator."""
        notes = []
        self.dp.check()
        for w in self.cfg.workloads:
            cgroup_id(w.cgroup)
        f = features.probe(self.cfg.bpffs)
        if not f.btf:
            notes.append("kernel has no BTF (/sys/kernel/btf/vmlinux)")
        if not f.sockmap:
            raise DabbaError(
                "the kernel cannot create a SOCKHASH map: sockmap support is missing",
                hint="the plaintext steering and the tunnel's own listeners are SOCKHASH maps "
                "(CONFIG_BPF_STREAM_PARSER / CONFIG_NET_SOCK_MSG, 5.10+)",
            )
        notes.append(
            f"kernel {f.kernel}: BTF {'yes' if f.btf else 'no'}, sockmap yes, "
            f"kernel TLS {'yes' if f.ktls else 'no'}, cgroup v2 at {f.cgroup2}"
        )
        notes.append(f"{len(self.cfg.workloads)} workload(s) to enrol; pins at {self.dp.pins.root}")
        c = self.cfg.control
        if c is not None:
            from .identity import CertStore

            if not os.access(c.ca_file, os.R_OK):
                raise DabbaError(
                    f"control.ca_file {c.ca_file} is not readable",
                    hint="copy the control plane's <state>/ca/bundle.pem there",
                )
            if CertStore(self.cfg.state_dir).has_node_identity():
                notes.append(f"already joined (identity in {self.cfg.state_dir}/identity)")
            elif not os.access(c.token_file, os.R_OK):
                raise DabbaError(
                    f"this node has not joined and control.token_file {c.token_file} is not readable",
                    hint=f"create one with `dabba control token create --node {self.cfg.node}`",
                )
            else:
                notes.append(f"will join {c.join_address} with the token in {c.token_file}")
        if self.cfg.tunnel.run and c is None:
            raise DabbaError(
                "tunnel.run needs a control section (the tunnel serves the control plane's "
                "workloads and certificates)"
            )
        return notes

    def start(self) -> None:
        self.check()
        t0 = time.monotonic()
        self.load_reports = self.dp.ensure()
        loaded = [r.program for r in self.load_reports if r.action == "loaded"]
        _log.info(
            "datapath ready",
            fields={
                "node": self.cfg.node,
                "loaded": len(loaded),
                "adopted": len(self.load_reports) - len(loaded),
                "s": f"{time.monotonic() - t0:.2f}",
            },
        )
        self._check_packet_sockets()
        self.reconcile()

    def _check_packet_sockets(self) -> None:
        """Enrol nothing where workloads' packet sockets would go around the mesh unrefused,
        unless the config accepts that (capture.packet_sockets: refuse-where-able)."""
        c = self.cfg.capture
        self.packet_sockets = self.ctl.packet_sockets_refused()
        refused, how = self.packet_sockets
        if refused or not c.enabled or c.non_tcp == "pass":
            _log.info(
                "workloads' packet sockets: "
                + (how if refused else "pass unmeshed (capture.non_tcp: pass or capture off)")
            )
            return
        if c.packet_sockets == "refuse":
            raise DabbaError(
                "this kernel cannot refuse packet sockets to workloads, so a workload holding "
                f"CAP_NET_RAW could send frames around the mesh: {how}",
                hint="boot with the BPF LSM active; or, where no workload holds CAP_NET_RAW "
                "(Kubernetes' restricted Pod Security Standard drops it), set "
                "capture.packet_sockets: refuse-where-able",
            )
        _log.warning(
            "workloads' packet sockets are NOT refused (capture.packet_sockets: "
            f"refuse-where-able): {how}; a workload holding CAP_NET_RAW can send frames "
            "around the mesh"
        )

    def reconcile(self) -> None:
        """Make the maps say what the config says (workloads from the config: no control plane)."""
        self._configure_datapath()
        if self.cfg.control is not None:
            self._hold_configured()
        else:
            from types import SimpleNamespace

            self._by_key = {
                f"{w.namespace}/{w.name}": SimpleNamespace(
                    name=w.name, namespace=w.namespace, spiffe_id="", labels={}
                )
                for w in self.cfg.workloads
            }
            self._enrol(
                [
                    (f"{w.namespace}/{w.name}", w.cgroup, w.capture, w.strict)
                    for w in self.cfg.workloads
                ]
            )

    def _configure_datapath(self) -> None:
        c = self.cfg
        # own.c first: only where it hands the spread ports to the tunnel are they used
        owned_now = c.control is not None and self.ctl.own_listeners()
        owned = c.control is not None
        self.ctl.configure(
            c.tunnel.address,
            c.tunnel.port,
            c.tunnel.mark,
            pass_non_tcp=c.capture.non_tcp == "pass",
            hbone_port=self.hbone_port(),
            max_open=self.max_connections(),
            tunnel_ip6=c.tunnel.address6,
            eject=(c.services.eject_after, c.services.eject_time, c.services.max_ejected),
            spread=c.tunnel.spread if owned else (0, 0),
        )
        if c.control is not None and c.tunnel.run:  # the tunnel will be our child, in our cgroup
            self.trust_tunnel("self")
        if owned_now:
            _log.info(
                "the tunnel's ports now go to the tunnel's own sockets only",
                fields={
                    "outbound": f"{c.tunnel.address}:{c.tunnel.port}",
                    "spread": "-".join(map(str, (c.tunnel.spread[0], sum(c.tunnel.spread) - 1)))
                    if c.tunnel.spread[1]
                    else "",
                    "hbone": self.hbone_port(),
                },
            )
        self.ctl.set_exclusions(c.capture.exclude_cidrs, c.capture.exclude_ports)
        self.ctl.set_tunnel_addrs(c.tunnel_addresses)
        self.ctl.set_mesh_ports(self.mesh_ports())
        self._sync_node_addrs()

    def trust_tunnel(self, pid: int | str) -> None:
        """Let the guard and the steering take the connections of the tunnel's cgroup (and only
        those) from a tunnel address as the tunnel's (bpf/tunops.c). On failure the tunnel's
        deliveries to STRICT and PERMISSIVE workloads are refused: fail closed, logged."""
        try:
            cg = features.cgroup_of(pid)
            if self.ctl.trust_tunnel_cgroup(cg):
                _log.info("the tunnel's connections are recorded", fields={"cgroup": cg})
        except DabbaError as e:
            _log.error(f"the tunnel's connections cannot be recognised: {e}")

    def max_connections(self) -> int:
        """Captured connections one workload may hold open (0: no limit)."""
        m = self.cfg.capture.max_connections
        return self.cfg.maps.captures // 4 if m is None else m

    def hbone_port(self) -> int:
        """The tunnel's HBONE port (0: no tunnel here, no control plane)."""
        c = self.cfg
        if c.tunnel.inbound:
            return int(c.tunnel.inbound.rsplit(":", 1)[1])
        return HBONE_PORT if c.control is not None else 0

    def mesh_ports(self) -> list[int]:
        """The mesh's own ports on this node: never a destination of its workloads."""
        ports = set(addresses.MESH_PORTS) | {self.cfg.tunnel.port, self.hbone_port()}
        return sorted(ports - {0})

    def _sync_node_addrs(self) -> None:
        """The node's own addresses, as the kernel refuses them (they change: DHCP, new links)."""
        addrs = addresses.node_addresses()
        if addrs != self._node_addrs:
            self.ctl.set_node_addrs(addrs)
            self._node_addrs = addrs
            _log.info("node addresses refused as destinations", fields={"addresses": addrs})

    async def watch_addresses(self, every: float = 5.0) -> None:
        """Keep dabba_node_ip in line with the node's addresses, and tunops.c on the tunnel's
        cgroup (detached by hand, or a tunnel that moved: attached again)."""
        while not self.stop.is_set():
            await asyncio.sleep(every)
            try:
                self._sync_node_addrs()
                if self.cfg.control is not None and self._tunnel_was_ready:
                    self.trust_tunnel("self" if self.cfg.tunnel.run else self._tunnel_pid())
            except (DabbaError, OSError, ValueError) as e:
                _log.error(str(e))

    def _hold_configured(self) -> None:
        """With a control plane, before its first snapshot (it may be unreachable at first
        boot): every configured workload not enrolled yet is held, captured and STRICT, so it
        is never outside the mesh. A restarted agent keeps what is enrolled until the cached
        snapshot is applied."""
        enrolled = set(self.ctl.workloads())
        for i, w in enumerate(self.cfg.workloads, start=1):
            key = f"{w.namespace}/{w.name}"
            try:
                if cgroup_id(w.cgroup) in enrolled:
                    continue
                flags = abi.WL_ACCOUNT | abi.WL_STRICT
                if w.capture and self.cfg.capture.enabled:
                    flags |= abi.WL_CAPTURE
                self.workload_ids[self.ctl.enrol(w.cgroup, i, flags)] = key
            except DabbaError as e:
                _log.error(f"workload {key} not held: {e}")
                continue
            _log.info(
                f"workload {key} is held (captured and STRICT) until the control plane speaks"
            )
        self.table.invalidate()

    def _enrol(self, entries: list[tuple[str, str, bool, bool]]) -> None:
        """entries: (namespace/name, cgroup, capture, strict); everything else is unenrolled."""
        want = {}
        for i, (key, cgroup, capture, strict) in enumerate(entries, start=1):
            flags = abi.WL_ACCOUNT
            if capture and self.cfg.capture.enabled:
                flags |= abi.WL_CAPTURE
            if strict:
                flags |= abi.WL_STRICT
            try:
                cg = self.ctl.enrol(cgroup, i, flags)
            except DabbaError as e:
                _log.error(f"workload {key} not enrolled: {e}")
                continue
            want[cg] = key
        for cg in set(self.ctl.workloads()) - set(want):
            self.ctl.unenrol(cg)
            _log.info("unenrolled workload no longer present", fields={"cgroup_id": cg})
        if want != self.workload_ids or not os.path.exists(self._enrolled_path):
            # the tunnel knows a captured connection's workload by the cgroup id the kernel
            # records: a Kubernetes pod's cgroup is found here (by its UID), not in the snapshot
            private_dir(self.cfg.state_dir)
            atomic_write(
                self._enrolled_path,
                json.dumps({str(cg): key for cg, key in sorted(want.items())}).encode(),
            )
        self.workload_ids = want
        _log.info("workloads enrolled", fields={"count": len(want)})

    @property
    def _enrolled_path(self) -> str:
        return os.path.join(self.cfg.state_dir, ENROLLED_FILE)

    def _steer(self, steer: list[tuple[str, str]]) -> None:
        """Attach the sk_lookup steering to these workloads' namespaces; detach it elsewhere."""
        keep = set()
        for key, netns in steer:
            try:
                if self.ctl.steer_plaintext(netns):
                    _log.info(
                        "plaintext to the workload now goes through the tunnel (15006)",
                        fields={"workload": key, "netns": netns},
                    )
                keep.add(os.stat(netns).st_ino)
            except (DabbaError, OSError) as e:
                _log.error(f"workload {key}: plaintext steering not attached: {e}")
        gone = self.ctl.unsteer_plaintext(keep)
        if gone:
            _log.info("plaintext steering removed", fields={"namespaces": gone})

    def apply_snapshot(self, snap, certs) -> None:
        """Enrol the node's workloads from a control-plane snapshot, each once its certificate is here."""
        by_name = {f"{w.namespace}/{w.name}": w for w in self.cfg.workloads}
        entries = []
        steer = []  # (key, netns): workloads with plaintext (PERMISSIVE/DISABLE) on some port
        port_modes = {}  # (ip, port) -> mode: portLevelMtls of enrolled workloads
        pod_keys = set()
        waypoint_pods: set[str] = set()
        for w in snap.workloads:
            if w.node != self.cfg.node:
                continue
            key = f"{w.namespace}/{w.name}"
            if w.waypoint:  # Envoy, HBONE in and out itself: capturing it would loop
                if key not in self._waypoint_pods:
                    _log.info(
                        f"workload {key} is a pod of waypoint {w.waypoint}: not captured (it "
                        "speaks HBONE in and out itself)"
                    )
                waypoint_pods.add(key)
                continue
            local = by_name.get(key)
            cgroup = (local.cgroup if local else "") or w.cgroup
            netns = w.netns
            if not cgroup and w.pod_uid:  # a Kubernetes pod: the kubelet named its cgroup
                cgroup, netns = self._find_pod(key, w.pod_uid)
                pod_keys.add(key)
            if not cgroup:
                _log.warning(f"workload {key} has no known cgroup on this node; not enrolled")
                continue
            # captured from its first socket, even before a tunnel listens: its connections
            # then fail (nothing on the capture port), never fall back to plaintext
            capture = local.capture if local else True
            if key not in certs:
                # held until its certificate arrives: captured (the tunnel refuses its
                # connections, saying why) and STRICT (no plaintext in); never left outside
                _log.info(
                    f"workload {key} is held (captured and STRICT) until its certificate arrives"
                )
                entries.append((key, cgroup, capture, True))
                continue
            entries.append((key, cgroup, capture, w.mtls_mode == "STRICT"))
            if w.port_mtls:  # port 0: the workload's own mode, for the ports not listed
                port_modes.update(
                    {
                        (ip, p): m
                        for p, m in {0: w.mtls_mode, **w.port_mtls}.items()
                        for ip in filter(None, (w.ip, w.ip6))
                    }
                )
            if capture and netns and plaintext_ports(w):
                steer.append((key, netns))
            if netns:
                self._netns[key] = netns
        self._last = (snap, certs)
        self._waypoint_pods = waypoint_pods
        self._pods = {k: v for k, v in self._pods.items() if k in pod_keys}
        self._by_key = {f"{w.namespace}/{w.name}": w for w in snap.workloads}
        self._svc_by_vip = {s.vip: s for s in snap.services}
        self._by_ip.clear()
        self._by_ip.update({ip: w for w in snap.workloads for ip in (w.ip, w.ip6) if ip})
        self._enrol(entries)
        self.ctl.set_port_mtls(port_modes)
        self._steer(steer)
        self._kernel_sync(snap, certs)

    def _kernel_sync(self, snap, certs) -> None:
        """What the kernel decides itself: same-node verdicts, then services (a VIP resolved to a
        local endpoint goes direct only where a verdict allows it)."""
        self.same_node.sync(snap, certs)
        self.kernel_services.sync(snap, certs)
        self.table.invalidate()  # flows' shapes are made again from the new workloads and rules

    def _find_pod(self, key: str, uid: str) -> tuple[str, str]:
        """A pod's cgroup (below the agent's cgroup) and netns, found by its UID; ("", "")
        while the kubelet has not made its cgroup here yet."""
        cgroup = pods.pod_cgroup(self.cfg.cgroup, uid) or ""
        netns = (pods.pod_netns(cgroup) or "") if cgroup else ""
        if self._pods.get(key) != (cgroup, netns):
            self._pods[key] = (cgroup, netns)
            if cgroup:
                _log.info(
                    f"pod {key} found on this node",
                    fields={"uid": uid, "cgroup": cgroup, "netns": netns or "(no process yet)"},
                )
            else:
                _log.warning(f"pod {key} (uid {uid}) has no cgroup below {self.cfg.cgroup} yet")
        return cgroup, netns

    @property
    def _pods_waiting(self) -> bool:
        """A pod of the last snapshot has no cgroup or netns here yet."""
        return not all(cg and ns for cg, ns in self._pods.values())

    async def retry_pods(self, every: float = 5.0) -> None:
        """Apply the last snapshot again while one of its pods has no cgroup or process here
        yet (the kubelet makes them as the pod starts)."""
        while not self.stop.is_set():
            await asyncio.sleep(every)
            if self._pods_waiting and self._last:
                self.apply_snapshot(*self._last)

    def _tunnel_pid(self) -> int:
        with open(os.path.join(self.cfg.state_dir, "tunnel.ready")) as f:
            return int(f.read())

    def tunnel_ready(self) -> bool:
        if not self.cfg.tunnel.run and (self.cfg.control is None or not self.cfg.capture.enabled):
            return True  # someone else runs the tunnel, or nothing is captured
        try:
            pid = self._tunnel_pid()
        except (OSError, ValueError):
            return False
        if not self.cfg.tunnel.run:  # its own service (dabba-tunnel.service): is it alive?
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
            return True
        return (
            self.tunnel_proc is not None
            and self.tunnel_proc.pid == pid
            and self.tunnel_proc.returncode is None
        )

    async def watch_tunnel(self) -> None:
        """The tunnel runs as its own service: start capturing once it has listened.

        After that, capture stays on while the tunnel restarts (connections fail closed
        meanwhile) and while this agent restarts: the tunnel is not the agent's child.
        """
        while not self.stop.is_set() and not self._tunnel_was_ready:
            if self.tunnel_ready():
                self._tunnel_was_ready = True
                self.trust_tunnel(self._tunnel_pid())
                _log.info("tunnel ready (its own service); capturing")
                if self._last:
                    self.apply_snapshot(*self._last)
                return
            await asyncio.sleep(0.2)

    def health(self) -> str | None:
        """None when the agent works; else why not (the watchdog then stops pinging)."""
        if self._drain_thread is not None and not self._drain_thread.is_alive():
            return "the flow-record thread died"
        if time.monotonic() - self._drain_beat > 10:
            return f"the flow-record thread is stuck ({time.monotonic() - self._drain_beat:.0f}s)"
        return None

    async def supervise_tunnel(self) -> None:
        """Run the tunnel; restart it when it exits (backoff 1 s to 30 s); re-enrol when it is ready."""
        import sys

        c = self.cfg
        inbound = c.tunnel.inbound or f"{c.control.node_address}:{HBONE_PORT}"
        argv = [
            sys.executable,
            "-m",
            "agent.cli",
            "tunnel",
            "run",
            "--node",
            c.node,
            "--state-dir",
            c.state_dir,
            "--maps",
            self.dp.pins.maps,
            "--outbound",
            f"{c.tunnel.address}:{c.tunnel.port}",
            "--inbound",
            inbound,
            "--drain",
            str(c.tunnel.drain),
            "--workers",
            c.tunnel.workers,
            "--source",
            c.tunnel_source(4),
        ]
        if c.tunnel.address6:
            argv += ["--outbound6", f"[{c.tunnel.address6}]:{c.tunnel.port}"]
            if c.tunnel_source(6):
                argv += ["--source6", c.tunnel_source(6)]
        delay = 1.0
        private_dir(c.state_dir)
        log_path = os.path.join(c.state_dir, "tunnel.log")
        while not self.stop.is_set():
            with open(log_path, "ab") as logf:
                self.tunnel_proc = await asyncio.create_subprocess_exec(
                    *argv, stdout=logf, stderr=logf
                )
            started = time.monotonic()
            while self.tunnel_proc.returncode is None and not self.tunnel_ready():
                await asyncio.sleep(0.1)
                if self.stop.is_set():
                    break
            if self.tunnel_ready():
                _log.info("tunnel ready; capturing", fields={"pid": self.tunnel_proc.pid})
                first = not self._tunnel_was_ready
                self._tunnel_was_ready = True
                if first and self._last:
                    self.apply_snapshot(*self._last)
            rc = await self._wait_tunnel(argv, log_path)
            if self.stop.is_set():
                break
            self.tunnel_restarts += 1
            delay = 1.0 if time.monotonic() - started > 30 else min(delay * 2, 30.0)
            _log.warning(f"tunnel exited with {rc}; restarting in {delay:.0f}s (log {log_path})")
            await asyncio.sleep(delay)

    async def _wait_tunnel(self, argv: list[str], log_path: str) -> int:
        """Wait for the tunnel to exit, upgrading it in place whenever upgrade_tunnel is set.

        An upgrade starts a successor, which borrows the old tunnel's listening sockets
        (ztunnel/listeners.py) and, once ready, receives the spliced connections from the old tunnel
        (SCM_RIGHTS) when that one gets SIGTERM; the old one then drains.
        """
        while True:
            exited = asyncio.ensure_future(self.tunnel_proc.wait())
            upgrade = asyncio.ensure_future(self.upgrade_tunnel.wait())
            await asyncio.wait([exited, upgrade], return_when=asyncio.FIRST_COMPLETED)
            upgrade.cancel()
            if exited.done():
                return exited.result()
            exited.cancel()
            self.upgrade_tunnel.clear()
            old = self.tunnel_proc
            with open(log_path, "ab") as logf:
                new = await asyncio.create_subprocess_exec(*argv, stdout=logf, stderr=logf)
            _log.info("tunnel upgrade: successor started", fields={"old": old.pid, "new": new.pid})
            self.tunnel_proc = new  # tunnel_ready() now waits for the successor's file
            deadline = time.monotonic() + 60
            while (
                new.returncode is None and not self.tunnel_ready() and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.1)
            if not self.tunnel_ready():
                _log.error(
                    "tunnel upgrade failed: the successor never became ready; keeping the old one"
                )
                if new.returncode is None:
                    new.kill()
                await new.wait()
                self.tunnel_proc = old
                with open(os.path.join(self.cfg.state_dir, "tunnel.ready"), "w") as f:
                    f.write(str(old.pid))
                continue
            old.terminate()  # it hands its spliced connections over, then drains
            self._draining.append(old)
            asyncio.ensure_future(old.wait()).add_done_callback(
                lambda _f, o=old: self._draining.remove(o)
            )
            self.tunnel_upgrades += 1
            _log.info("tunnel upgraded", fields={"old": old.pid, "new": new.pid})

    async def stop_tunnel(self) -> None:
        for p in [self.tunnel_proc, *self._draining]:
            if p is not None and p.returncode is None:
                p.terminate()
                try:
                    await asyncio.wait_for(p.wait(), self.cfg.tunnel.drain + 5)
                except TimeoutError:
                    p.kill()

    def write_status(self) -> None:
        private_dir(self.cfg.state_dir)
        st = {
            "node": self.cfg.node,
            "pid": os.getpid(),
            "started": self.started,
            "updated": time.time(),
            "load": [r.__dict__ for r in self.load_reports],
            "workloads": self.workload_ids,
            "stats": self.ctl.stats(),
            "same_node": self.same_node.status(),
            "kernel_services": self.kernel_services.status(),
            "closed_kept": len(self.closed),
            "control": self.sync.status() if self.sync else None,
            "tunnel": {
                "supervised": self.cfg.tunnel.run,
                "ready": self.tunnel_ready(),
                "capturing": self._tunnel_was_ready or not self.cfg.capture.enabled,
                "pid": self.tunnel_proc.pid if self.tunnel_proc else None,
                "restarts": self.tunnel_restarts,
                "upgrades": self.tunnel_upgrades,
                "draining": [p.pid for p in self._draining],
            },
        }
        tmp = os.path.join(self.cfg.state_dir, "status.json.tmp")
        with open(tmp, "w") as f:
            json.dump(st, f, indent=1)
        os.replace(tmp, os.path.join(self.cfg.state_dir, "status.json"))
        self.closed.write()

    def run(self) -> None:
        """Start, then drain flow records (and follow the control plane) until stopped."""
        starting = threading.Event()
        every = systemd.watchdog_interval()
        if every is not None:  # systemd's watchdog runs during start-up too (the first compile)

            def ping():
                while not starting.wait(min(every, 5.0)):
                    systemd.notify("WATCHDOG=1")

            threading.Thread(target=ping, name="startup-watchdog", daemon=True).start()
        systemd.notify("STATUS=loading the datapath (the first start compiles the eBPF programs)")
        try:
            self.start()
        finally:
            starting.set()
        from .api import AgentApi
        from .sync import ControlSync

        c = self.cfg.control
        if c is not None:
            self.sync = ControlSync(
                self.cfg.node,
                c.node_address,
                c.address,
                c.join_address,
                c.ca_file,
                c.token_file,
                self.cfg.state_dir,
                self.apply_snapshot,
                before_write=self._kernel_sync,
            )
        # The flow thread allocates a few objects per closed flow, tens of thousands a second
        # under connection churn, of which none form cycles (heap.settle)
        heap.settle(young=heap.GC_YOUNG)
        drain = threading.Thread(target=self._drain_flows, name="flows", daemon=True)
        self._drain_thread = drain
        drain.start()

        async def main():
            loop = asyncio.get_running_loop()
            stopped = asyncio.Event()

            def on_stop():
                systemd.notify("STOPPING=1")
                self.stop.set()
                stopped.set()
                if self.sync is not None:
                    self.sync.stop()

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_stop)
            loop.add_signal_handler(signal.SIGHUP, self.upgrade_tunnel.set)
            self.api = AgentApi(self)
            await self.api.start()
            tasks = [asyncio.ensure_future(self.sync.run() if self.sync else stopped.wait())]
            if self.cfg.tunnel.run:
                sup = asyncio.ensure_future(self.supervise_tunnel())
                sup.add_done_callback(_log_task_failure)
                tasks.append(sup)
            elif self.cfg.control is not None and self.cfg.capture.enabled:
                tasks.append(asyncio.ensure_future(self.watch_tunnel()))
            tasks.append(asyncio.ensure_future(systemd.watchdog(self.health)))
            tasks.append(asyncio.ensure_future(self.retry_pods()))
            tasks.append(asyncio.ensure_future(self.watch_addresses()))
            systemd.notify(
                "READY=1",
                f"STATUS=datapath pinned ({len(self.load_reports)} programs), "
                f"{len(self.workload_ids)} workloads enrolled, API on {os.path.join(self.cfg.state_dir, 'agent.sock')}",
            )
            try:
                await tasks[0]
            finally:
                for t in tasks[1:]:
                    t.cancel()
                await self.stop_tunnel()
                self.api.close()

        try:
            asyncio.run(main())
        finally:
            self.stop.set()
            drain.join(5)

    def _drain_flows(self) -> None:
        src = FlowSource(self.dp.pins.maps)
        last_status = 0.0
        trimmer = heap.Trimmer()
        try:
            while not self.stop.is_set():
                self._drain_beat = time.monotonic()
                recs, raws, wall = src.closed_raw(timeout_ms=200)
                n = len(recs)
                if n:
                    self.closed.add(recs, raws, wall)
                    self.table.on_closed(*recs, raws=raws, wall=wall)
                self.table.tick()
                if 0 < n < DRAIN_BATCH_MAX:  # let the next ones gather: a wakeup per batch
                    self.stop.wait(DRAIN_BATCH_S)
                if time.monotonic() - last_status > 1.0:
                    self.write_status()
                    last_status = time.monotonic()
                    trimmer.maybe()  # what bursts of records left free in the C heap
        finally:
            src.close()
            self.write_status()
            self.closed.close()
            _log.info(
                "agent stopped; programs stay attached and pinned", fields={"node": self.cfg.node}
            )

    def live_records(self) -> list[FlowRecord]:
        """The kernel's live flow records (read from the pinned map, without the ring)."""
        if self._flow_map is None:
            self._flow_map = Map.pinned(os.path.join(self.dp.pins.maps, names.MAP_FLOWS))
        out = []
        for _, v in self._flow_map.items():
            try:
                out.append(FlowRecord.from_raw(v))
            except ValueError:
                continue  # a record being written
        return out

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
