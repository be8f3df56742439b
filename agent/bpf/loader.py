"""Loaders: one object per hook (load, attach, detach, adopt), and a node's datapath.

Pin layout of a node (``<bpffs>/dabba/<node>/``)::

    maps/<map>      every map (include/maps.h), created by the first program
    progs/<prog>    every program
    links/<prog>    the bpf_link attaching a cgroup program to the node cgroup

A pinned link keeps its program attached with no process holding it, so
capture and accounting go on while the agent is down. A restarted agent
finds the pins and adopts them through the bpf() syscall alone: no compile,
no second attachment. bcc is imported only when something must be compiled.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources

from .. import log
from ..errors import DabbaError
from . import features, names
from . import sys as bpfsys

_log = log.get("bpf")

# bcc's program types (bcc.BPF.*), here to avoid importing bcc to name them.
PROG_CGROUP_SKB = 8
PROG_CGROUP_SOCK = 9
PROG_SOCK_OPS = 13
PROG_SK_SKB = 14
PROG_CGROUP_SOCK_ADDR = 18
PROG_SK_LOOKUP = 30


def compile_programs(programs: list[Program], cflags: list[str]) -> dict[str, float]:
    """Compile, load and pin programs with bcc in one child process.

    bcc maps LLVM into whoever imports it (about 175 MiB resident); the
    agent should not carry that for its whole life, so it never imports bcc.
    """
    import json
    import subprocess
    import sys

    job = {"cflags": cflags, "programs": [p.compile_job() for p in programs]}
    r = subprocess.run(
        [sys.executable, "-m", "agent.bpf.compile", json.dumps(job)], capture_output=True, text=True
    )
    if r.returncode != 0:
        detail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        failed = next((p for p in programs if detail.startswith(p.function + ":")), programs[0])
        why = verifier_reason(r.stderr)
        raise DabbaError(
            f"loading {failed.hook} program {failed.function} from {failed.compile_job()['source']} "
            f"failed: {detail.removeprefix(failed.function + ': ')}"
            + (f"; the verifier said: {why}" if why else ""),
            hint="is the kernel new enough (5.15+, BTF, cgroup BPF, sockmap) and are kernel "
            "headers installed? `make setup` checks both",
        )
    return json.loads(r.stdout)


def verifier_reason(log: str) -> str:
    """The verifier's last word before its summary ("processed N insns ..."), or ""."""
    lines = [x.strip() for x in log.splitlines() if x.strip()]
    for i, line in enumerate(lines):
        if line.startswith("processed ") and " insns " in line and i > 0:
            return lines[i - 1]
    return ""


def bpf_source_dir() -> str:
    """The folder of the C sources, resolved from the package (never the cwd)."""
    return str(resources.files("agent") / "bpf")


@dataclass(frozen=True)
class MapSizes:
    """Map sizes, passed to the C as -D flags (include/config.h)."""

    workloads: int = 4096
    captures: int = 16384
    flows: int = 65536
    ring_pages: int = 64
    splice: int = 16384
    exclusions: int = 256
    tunnel_addrs: int = 256

    def cflags(self) -> list[str]:
        if self.ring_pages & (self.ring_pages - 1):
            raise DabbaError(f"map sizes: ring_pages must be a power of two, not {self.ring_pages}")
        return [
            f"-DDABBA_WL_MAX={self.workloads}",
            f"-DDABBA_CAP_MAX={self.captures}",
            f"-DDABBA_FLOW_MAX={self.flows}",
            f"-DDABBA_RING_PAGES={self.ring_pages}",
            f"-DDABBA_SPLICE_MAX={self.splice}",
            f"-DDABBA_EXCL_MAX={self.exclusions}",
            f"-DDABBA_TUN_ADDR_MAX={self.tunnel_addrs}",
        ]


@dataclass
class LoadReport:
    """What ensure() did for one program."""

    program: str
    action: str  # "loaded" (compiled now) or "adopted" (found pinned)
    seconds: float


class Program:
    """Loader of one hook: a C file, its function, where and how it attaches."""

    source: str = ""
    function: str = ""
    hook: str = ""  # as operators know it, e.g. "cgroup/connect4"
    prog_type: int = 0
    expected_attach: int = -1  # for the verifier (sock_addr and sock programs)
    attach_type: int = 0

    def __init__(self, pins: Pins):
        self.pins = pins

    # -- paths --
    @property
    def prog_pin(self) -> str:
        return os.path.join(self.pins.progs, self.function)

    @property
    def link_pin(self) -> str:
        return os.path.join(self.pins.links, self.function)

    # -- lifecycle --
    def compile_job(self) -> dict:
        """This program's entry for agent/bpf/compile.py."""
        return {
            "source": os.path.join(bpf_source_dir(), self.source),
            "function": self.function,
            "prog_type": self.prog_type,
            "expected_attach": self.expected_attach,
            "pin": self.prog_pin,
        }

    def attach(self, prog_fd: int, target_fd: int) -> None:
        """Attach through a pinned bpf_link."""
        link = bpfsys.link_create(
            prog_fd, target_fd, self.attach_type, f"{self.hook} {self.function}"
        )
        try:
            bpfsys.obj_pin(link, self.link_pin)
        finally:
            os.close(link)

    def attached(self, target_fd: int, prog_id: int) -> int:
        """How many times prog_id is attached to the target for our attach type."""
        ids = bpfsys.prog_query(target_fd, self.attach_type, f"of {self.hook}")
        return ids.count(prog_id)

    def detach(self, target_fd: int | None) -> None:
        """Remove the link pin (detaching the program) and the program pin."""
        for p in (self.link_pin, self.prog_pin):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


class OwnerProgram(Program):
    """cgroup/sock_create: tags sockets of enrolled workloads (sock.c)."""

    source = "sock.c"
    function = names.PROG_SOCK_CREATE
    hook = "cgroup/sock_create"
    prog_type = PROG_CGROUP_SOCK
    expected_attach = bpfsys.BPF_CGROUP_INET_SOCK_CREATE
    attach_type = bpfsys.BPF_CGROUP_INET_SOCK_CREATE


class CaptureProgram(Program):
    """cgroup/connect4: redirects enrolled workloads' connect() (connect.c)."""

    source = "connect.c"
    function = names.PROG_CONNECT4
    hook = "cgroup/connect4"
    prog_type = PROG_CGROUP_SOCK_ADDR
    expected_attach = bpfsys.BPF_CGROUP_INET4_CONNECT
    attach_type = bpfsys.BPF_CGROUP_INET4_CONNECT


class Capture6Program(CaptureProgram):
    """cgroup/connect6: the same for AF_INET6 sockets, IPv4-mapped included (connect.c)."""

    function = names.PROG_CONNECT6
    hook = "cgroup/connect6"
    expected_attach = bpfsys.BPF_CGROUP_INET6_CONNECT
    attach_type = bpfsys.BPF_CGROUP_INET6_CONNECT


class Sendmsg4Program(CaptureProgram):
    """cgroup/sendmsg4: unconnected UDP of enrolled workloads, only DNS leaves (connect.c)."""

    function = names.PROG_SENDMSG4
    hook = "cgroup/sendmsg4"
    expected_attach = bpfsys.BPF_CGROUP_UDP4_SENDMSG
    attach_type = bpfsys.BPF_CGROUP_UDP4_SENDMSG


class Sendmsg6Program(CaptureProgram):
    """cgroup/sendmsg6: the same for AF_INET6 sockets (connect.c)."""

    function = names.PROG_SENDMSG6
    hook = "cgroup/sendmsg6"
    expected_attach = bpfsys.BPF_CGROUP_UDP6_SENDMSG
    attach_type = bpfsys.BPF_CGROUP_UDP6_SENDMSG


class FlowProgram(Program):
    """sockops: flow records and the tunnel's 4-tuple lookup (sockops.c)."""

    source = "sockops.c"
    function = names.PROG_SOCKOPS
    hook = "sockops"
    prog_type = PROG_SOCK_OPS
    attach_type = bpfsys.BPF_CGROUP_SOCK_OPS


class GuardProgram(Program):
    """cgroup_skb/ingress: STRICT workloads accept only the tunnel (guard.c)."""

    source = "guard.c"
    function = names.PROG_GUARD
    hook = "cgroup_skb/ingress"
    prog_type = PROG_CGROUP_SKB
    attach_type = bpfsys.BPF_CGROUP_INET_INGRESS


class SpliceProgram(Program):
    """sk_skb stream verdict on the dabba_splice SOCKHASH (splice.c).

    Attached to the map, not to a cgroup: the attachment lives as long as
    the pinned map, so it needs no link (sockmap links need kernel 6.10).
    """

    source = "splice.c"
    function = names.PROG_SPLICE
    hook = "sk_skb/stream_verdict"
    prog_type = PROG_SK_SKB
    attach_type = bpfsys.BPF_SK_SKB_STREAM_VERDICT

    def attach(self, prog_fd: int, target_fd: int) -> None:
        bpfsys.prog_attach(prog_fd, target_fd, self.attach_type, f"{self.hook} {self.function}")

    def attached(self, target_fd: int, prog_id: int) -> int:
        try:
            return super().attached(target_fd, prog_id)
        except bpfsys.BPFError as e:
            if e.errno != errno.EINVAL:  # kernels before 5.19 cannot query a sockmap
                raise
            return -1  # unknown

    def detach(self, target_fd: int | None) -> None:
        if target_fd is not None and os.path.exists(self.prog_pin):
            fd = bpfsys.obj_get(self.prog_pin)
            try:
                bpfsys.prog_detach(fd, target_fd, self.attach_type, self.hook)
            except bpfsys.BPFError:
                pass
            finally:
                os.close(fd)
        super().detach(target_fd)


class PlainProgram(Program):
    """sk_lookup: plaintext to a PERMISSIVE workload goes to the tunnel's 15006 (plain.c).

    Loaded and pinned with the others, but attached per workload network
    namespace by DatapathControl.steer_plaintext (a pinned netns link each).
    """

    source = "plain.c"
    function = names.PROG_PLAIN
    hook = "sk_lookup"
    prog_type = PROG_SK_LOOKUP
    expected_attach = bpfsys.BPF_SK_LOOKUP
    attach_type = bpfsys.BPF_SK_LOOKUP

    def netns_link_pin(self, netns_ino: int) -> str:
        return os.path.join(self.pins.links, f"{self.function}_{netns_ino}")

    def netns_links(self) -> int:
        if not os.path.isdir(self.pins.links):
            return 0
        return sum(1 for f in os.listdir(self.pins.links) if f.startswith(f"{self.function}_"))

    def detach(self, target_fd: int | None) -> None:
        for f in os.listdir(self.pins.links) if os.path.isdir(self.pins.links) else []:
            if f.startswith(f"{self.function}_"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.pins.links, f))
        super().detach(target_fd)


class OwnProgram(Program):
    """sk_lookup: connections to the tunnel's ports go to its own sockets only (own.c).

    Loaded and pinned with the others, attached to the node's network
    namespace by DatapathControl.own_listeners (one pinned link), never by
    ensure(): whoever loads the datapath may run in another namespace.
    """

    source = "own.c"
    function = names.PROG_OWN
    hook = "sk_lookup"
    prog_type = PROG_SK_LOOKUP
    expected_attach = bpfsys.BPF_SK_LOOKUP
    attach_type = bpfsys.BPF_SK_LOOKUP


class TunnelOpsProgram(Program):
    """sockops on the tunnel's own cgroup: records the tunnel's connections (tunops.c).

    Attached by DatapathControl.trust_tunnel_cgroup, not by ensure(): the
    tunnel's cgroup is known once the tunnel runs.
    """

    source = "tunops.c"
    function = names.PROG_TUN_OPS
    hook = "sockops (tunnel cgroup)"
    prog_type = PROG_SOCK_OPS
    attach_type = bpfsys.BPF_CGROUP_SOCK_OPS


CGROUP_PROGRAMS = (
    OwnerProgram,
    CaptureProgram,
    Capture6Program,
    Sendmsg4Program,
    Sendmsg6Program,
    FlowProgram,
    GuardProgram,
)
ALL_PROGRAMS = CGROUP_PROGRAMS + (SpliceProgram, PlainProgram, OwnProgram, TunnelOpsProgram)


@dataclass(frozen=True)
class Pins:
    """The pin folders of one node."""

    root: str  # <bpffs>/dabba/<node>

    @property
    def maps(self) -> str:
        return os.path.join(self.root, "maps")

    @property
    def progs(self) -> str:
        return os.path.join(self.root, "progs")

    @property
    def links(self) -> str:
        return os.path.join(self.root, "links")

    def map_path(self, name: str) -> str:
        return os.path.join(self.maps, name)

    def exists(self) -> bool:
        return os.path.isdir(self.root)


@dataclass
class ProgramStatus:
    """One program in `dabba bpf status`."""

    name: str
    hook: str
    pinned: bool
    id: int | None = None
    tag: str | None = None
    attached: int = 0  # times attached to its target (-1 unknown)
    loaded_at: float | None = None  # seconds since boot
    # attached to namespaces or the tunnel's cgroup, not the node's cgroup: any count is right
    elsewhere: bool = False


@dataclass
class MapStatus:
    """One map in `dabba bpf status`."""

    name: str
    type: str
    max_entries: int
    entries: int | None  # None where counting makes no sense (ringbuf, arrays, storage)

    @property
    def fill(self) -> float | None:
        if self.entries is None or not self.max_entries:
            return None
        return self.entries / self.max_entries


@dataclass
class DatapathStatus:
    """Everything `dabba bpf status` shows for a node."""

    node: str
    pin_root: str
    cgroup: str
    programs: list[ProgramStatus] = field(default_factory=list)
    maps: list[MapStatus] = field(default_factory=list)
    counters: dict[str, int] = field(
        default_factory=dict
    )  # dabba_stats: captures, map full, ring drops

    def healthy(self) -> bool:
        return all(p.pinned and (p.attached in (1, -1) or p.elsewhere) for p in self.programs)

    def as_dict(self) -> dict:
        return {
            "node": self.node,
            "pin_root": self.pin_root,
            "cgroup": self.cgroup,
            "healthy": self.healthy(),
            "programs": [p.__dict__ for p in self.programs],
            "maps": [dict(m.__dict__, fill=m.fill) for m in self.maps],
            "counters": self.counters,
        }


# Maps whose entry count is meaningful for "fill".
_COUNTED = {"hash", "lru_hash", "lpm_trie", "sockhash"}


class Datapath:
    """The eBPF datapath of one node: its programs, attachments and maps.

    ``cgroup`` is the cgroup v2 folder holding the node's workloads; every
    cgroup program attaches there once and applies to all cgroups below.
    """

    def __init__(
        self, node: str, cgroup: str, bpffs: str = "/sys/fs/bpf", sizes: MapSizes | None = None
    ):
        if not node or "/" in node or node.startswith("."):
            raise DabbaError(f"invalid node name {node!r}: use letters, digits, '-' and '_'")
        self.node = node
        self.cgroup = cgroup
        self.bpffs = bpffs
        self.sizes = sizes or MapSizes()
        self.pins = Pins(os.path.join(bpffs, "dabba", node))
        self.programs = [cls(self.pins) for cls in ALL_PROGRAMS]

    # -- helpers --
    def _cflags(self) -> list[str]:
        inc = os.path.join(bpf_source_dir(), "include")
        return [
            f"-I{inc}",
            f'-DDABBA_PIN_MAPS="{self.pins.maps}/"',
            "-Wno-macro-redefined",
            *self.sizes.cflags(),
        ]

    def _cgroup_fd(self) -> int:
        try:
            return os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise DabbaError(
                f"node cgroup {self.cgroup} does not exist",
                hint="create it, or check the agent's config",
            ) from None

    def open_map(self, name: str) -> bpfsys.Map:
        path = self.pins.map_path(name)
        try:
            return bpfsys.Map.pinned(path)
        except FileNotFoundError:
            raise DabbaError(
                f"map {name} is not pinned at {path}",
                hint=f"is the datapath of node {self.node} loaded? (dabba bpf status --node {self.node})",
            ) from None

    def check(self) -> None:
        """Check the kernel features and paths before anything is created."""
        features.require_bpffs(self.bpffs)
        features.require_cgroup2(self.cgroup)

    # -- lifecycle --
    def ensure(self) -> list[LoadReport]:
        """Load what is missing, adopt what is pinned; attach each program exactly once.

        On failure everything this call created is removed again, so a
        failed start leaves nothing behind (pins that existed before stay).
        """
        self.check()
        existed = self.pins.exists()
        for d in (self.pins.maps, self.pins.progs, self.pins.links):
            os.makedirs(d, exist_ok=True)
        reports: list[LoadReport] = []
        try:
            cg = self._cgroup_fd()
            try:
                missing = [p for p in self.programs if not os.path.exists(p.prog_pin)]
                compiled = compile_programs(missing, self._cflags()) if missing else {}
                for prog in self.programs:
                    reports.append(self._ensure_one(prog, cg, compiled.get(prog.function)))
            finally:
                os.close(cg)
        except BaseException:
            if not existed:
                self.remove()
            raise
        return reports

    def _ensure_one(self, prog: Program, cgroup_fd: int, compile_s: float | None) -> LoadReport:
        """Attach prog (pinned by now) unless it is attached already.

        compile_s: seconds its compile and load took, None when it was pinned already.
        """
        t0 = time.monotonic()
        action = "adopted" if compile_s is None else "loaded"
        fd = bpfsys.obj_get(prog.prog_pin)
        try:
            info = bpfsys.prog_info(fd)
            if isinstance(prog, SpliceProgram):
                with self.open_map(names.MAP_SPLICE) as sockhash:
                    if prog.attached(sockhash.fd, info.id) != 1:
                        prog.attach(fd, sockhash.fd)
            elif isinstance(prog, PlainProgram | OwnProgram | TunnelOpsProgram):
                pass  # attached elsewhere (steer_plaintext, own_listeners, trust_tunnel_cgroup)
            else:
                self._ensure_link(prog, fd, info.id, cgroup_fd)
        finally:
            os.close(fd)
        dt = time.monotonic() - t0 + (compile_s or 0.0)
        _log.info(
            f"{action} {prog.hook}",
            fields={"program": prog.function, "node": self.node, "s": f"{dt:.2f}"},
        )
        return LoadReport(prog.function, action, dt)

    def _ensure_link(self, prog: Program, prog_fd: int, prog_id: int, cgroup_fd: int) -> None:
        cg_id = os.fstat(cgroup_fd).st_ino
        if os.path.exists(prog.link_pin):
            lfd = bpfsys.obj_get(prog.link_pin)
            try:
                li = bpfsys.link_info(lfd)
            finally:
                os.close(lfd)
            if li.cgroup_id != cg_id:
                raise DabbaError(
                    f"{prog.hook} of node {self.node} is attached to another cgroup (id {li.cgroup_id}), "
                    f"not {self.cgroup} (id {cg_id})",
                    hint=f"run `dabba bpf unload --node {self.node}` first if the node's cgroup moved",
                )
            if li.prog_id != prog_id:
                raise DabbaError(
                    f"{prog.hook} link of node {self.node} holds program id {li.prog_id}, "
                    f"but the pinned program is id {prog_id}",
                    hint=f"the pins were changed by hand; `dabba bpf unload --node {self.node}` resets them",
                )
            return
        prog.attach(prog_fd, cgroup_fd)

    def remove(self) -> None:
        """Detach every program and remove every pin of the node. Idempotent."""
        if not self.pins.exists():
            return
        sockhash = None
        with contextlib.suppress(OSError):
            sockhash = bpfsys.obj_get(self.pins.map_path(names.MAP_SPLICE))
        try:
            for prog in self.programs:
                prog.detach(sockhash)
        finally:
            if sockhash is not None:
                os.close(sockhash)
        shutil.rmtree(self.pins.root, ignore_errors=True)
        # bpffs refuses rmtree's rmdir on non-empty dirs only if files remain
        for d in (self.pins.links, self.pins.progs, self.pins.maps, self.pins.root):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        _log.info("removed datapath", fields={"node": self.node, "pins": self.pins.root})

    # -- status --
    def status(self) -> DatapathStatus:
        st = DatapathStatus(self.node, self.pins.root, self.cgroup)
        cg = None
        with contextlib.suppress(OSError):
            cg = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        sockhash = None
        with contextlib.suppress(OSError):
            sockhash = bpfsys.obj_get(self.pins.map_path(names.MAP_SPLICE))
        try:
            for prog in self.programs:
                ps = ProgramStatus(prog.function, prog.hook, os.path.exists(prog.prog_pin))
                ps.elsewhere = isinstance(prog, PlainProgram | OwnProgram | TunnelOpsProgram)
                if ps.pinned:
                    fd = bpfsys.obj_get(prog.prog_pin)
                    try:
                        info = bpfsys.prog_info(fd)
                    finally:
                        os.close(fd)
                    ps.id, ps.tag, ps.loaded_at = info.id, info.tag, info.load_time_ns / 1e9
                    target = sockhash if isinstance(prog, SpliceProgram) else cg
                    if isinstance(prog, PlainProgram):
                        ps.attached = prog.netns_links()  # one per steered workload namespace
                    elif isinstance(prog, OwnProgram | TunnelOpsProgram):
                        ps.attached = int(os.path.exists(prog.link_pin))  # namespace, cgroup
                    elif target is not None:
                        ps.attached = prog.attached(target, info.id)
                st.programs.append(ps)
            for name in names.ALL_MAPS:
                path = self.pins.map_path(name)
                if not os.path.exists(path):
                    continue
                with bpfsys.Map.pinned(path) as m:
                    t = m.info.type_name
                    entries = m.count() if t in _COUNTED else None
                    st.maps.append(MapStatus(name, t, m.info.max_entries, entries))
            if os.path.exists(self.pins.map_path(names.MAP_STATS)):
                st.counters = DatapathControl(self).stats()
        finally:
            for fd in (cg, sockhash):
                if fd is not None:
                    os.close(fd)
        return st


class DatapathControl:
    """Runtime state of a node's datapath, through its pinned maps (no bcc).

    The one writer of dabba_cfg, dabba_wl, the exclusion maps and
    dabba_tun_addr: the agent.
    """

    def __init__(self, dp: Datapath):
        self.dp = dp

    def configure(
        self,
        tunnel_ip: str,
        tunnel_port: int,
        tunnel_mark: int = 0,
        enabled: bool = True,
        pass_non_tcp: bool = False,
        hbone_port: int = 0,
    ) -> None:
        """The node's runtime config. pass_non_tcp: enrolled workloads' UDP, raw and other
        non-TCP sockets pass unmeshed; otherwise only DNS (port 53) and loopback leave.
        hbone_port: the tunnel's HBONE port, owned by own.c like tunnel_ip:tunnel_port."""
        from . import abi

        flags = abi.CFG_PASS_NON_TCP if pass_non_tcp else 0
        cfg = abi.Config(
            abi.ip_be(tunnel_ip), tunnel_port, 1 if enabled else 0, tunnel_mark, flags, hbone_port
        )
        with self.dp.open_map(names.MAP_CFG) as m:
            m.update(abi.ctypes.c_uint32(0), cfg)

    def enrol(self, cgroup_path: str, workload_id: int, flags: int) -> int:
        """Enrol the workload whose cgroup is cgroup_path; returns its cgroup id."""
        from . import abi

        cg_id = cgroup_id(cgroup_path)
        with self.dp.open_map(names.MAP_WORKLOADS) as m:
            m.update(abi.ctypes.c_uint64(cg_id), abi.Workload(workload_id, flags))
        return cg_id

    def unenrol(self, cgroup_path_or_id: str | int) -> bool:
        from . import abi

        cg_id = (
            cgroup_path_or_id
            if isinstance(cgroup_path_or_id, int)
            else cgroup_id(cgroup_path_or_id)
        )
        with self.dp.open_map(names.MAP_WORKLOADS) as m:
            return m.delete(abi.ctypes.c_uint64(cg_id))

    def steer_plaintext(self, netns_path: str) -> bool:
        """Attach plain.c to a workload's network namespace (once); True if attached now."""
        prog = next(p for p in self.dp.programs if isinstance(p, PlainProgram))
        return self._attach_netns(prog, netns_path, prog.netns_link_pin, "workload")

    def own_listeners(self, netns_path: str = "/proc/self/ns/net") -> bool:
        """Attach own.c to the node's network namespace (once); True if attached now."""
        prog = next(p for p in self.dp.programs if isinstance(p, OwnProgram))
        return self._attach_netns(prog, netns_path, lambda _ino: prog.link_pin, "node")

    def trust_tunnel_cgroup(self, cgroup_path: str) -> bool:
        """Attach tunops.c to the tunnel's cgroup (moving it there if it was elsewhere); True if
        attached now. Refused for a cgroup that holds the node's workloads or every process."""
        prog = next(p for p in self.dp.programs if isinstance(p, TunnelOpsProgram))
        real = os.path.realpath(cgroup_path)
        node = os.path.realpath(self.dp.cgroup)
        if (
            real == os.path.realpath(features.cgroup2_root())
            or node.startswith(real + "/")
            or (node == real)
        ):
            raise DabbaError(
                f"the tunnel runs in cgroup {cgroup_path}, which holds other processes than "
                f"the tunnel's (the cgroup v2 root, or the workloads' {self.dp.cgroup}): its "
                "connections cannot be told from theirs",
                hint="run the tunnel in a cgroup of its own (dabba-tunnel.service, the agent's "
                "service, or a container)",
            )
        cg_id = cgroup_id(real)
        if os.path.exists(prog.link_pin):
            lfd = bpfsys.obj_get(prog.link_pin)
            try:
                if bpfsys.link_info(lfd).cgroup_id == cg_id:
                    return False
            finally:
                os.close(lfd)
            os.unlink(prog.link_pin)  # the tunnel moved: its old cgroup is trusted no more
        cg = os.open(real, os.O_RDONLY | os.O_DIRECTORY)
        pfd = bpfsys.obj_get(prog.prog_pin)
        try:
            prog.attach(pfd, cg)
        finally:
            os.close(pfd)
            os.close(cg)
        return True

    def _attach_netns(self, prog: Program, netns_path: str, pin_of, whose: str) -> bool:
        """Attach an sk_lookup program to a network namespace through a pinned link (pin_of:
        the namespace's inode -> pin path), unless that pin exists; True if attached now."""
        try:
            ns = os.open(netns_path, os.O_RDONLY)
        except OSError as e:
            raise DabbaError(f"{whose} network namespace {netns_path}: {e.strerror}") from None
        try:
            pin = pin_of(os.fstat(ns).st_ino)
            if os.path.exists(pin):
                return False
            pfd = bpfsys.obj_get(prog.prog_pin)
            try:
                link = bpfsys.link_create(pfd, ns, prog.attach_type, f"sk_lookup on {netns_path}")
                try:
                    bpfsys.obj_pin(link, pin)
                finally:
                    os.close(link)
            finally:
                os.close(pfd)
            return True
        finally:
            os.close(ns)

    def unsteer_plaintext(self, keep_netns_inos: set[int]) -> int:
        """Remove the sk_lookup links of every namespace not in keep; returns how many."""
        prog = next(p for p in self.dp.programs if isinstance(p, PlainProgram))
        gone = 0
        for f in os.listdir(self.dp.pins.links):
            if (
                f.startswith(f"{prog.function}_")
                and int(f.rsplit("_", 1)[1]) not in keep_netns_inos
            ):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.dp.pins.links, f))
                    gone += 1
        return gone

    def workloads(self) -> dict[int, tuple[int, int]]:
        """cgroup id -> (workload id, flags)."""
        from . import abi

        out = {}
        with self.dp.open_map(names.MAP_WORKLOADS) as m:
            for k, v in m.items():
                w = abi.from_bytes(abi.Workload, v)
                out[int.from_bytes(k, "little")] = (w.id, w.flags)
        return out

    def set_exclusions(self, cidrs: list[str], ports: list[int]) -> None:
        """Replace the capture exclusions: destination CIDRs and ports that go direct."""
        import ipaddress

        from . import abi

        nets = []
        for c in cidrs:
            try:
                n = ipaddress.IPv4Network(c, strict=False)
            except ValueError:
                raise DabbaError(f"capture exclusion {c!r} is not an IPv4 CIDR") from None
            nets.append(abi.LpmV4(n.prefixlen, abi.ip_be(str(n.network_address))))
        for p in ports:
            if not 0 < int(p) < 65536:
                raise DabbaError(f"capture exclusion port {p!r} is out of range")
        self._replace_keys(names.MAP_EXCL_NET, {bytes(n) for n in nets})
        self._replace_keys(names.MAP_EXCL_PORT, {int(p).to_bytes(2, "little") for p in ports})

    def set_tunnel_addrs(self, addrs: list[str]) -> None:
        """Replace the addresses STRICT workloads accept connections from."""
        from . import abi

        self._replace_keys(
            names.MAP_TUNNEL_ADDRS, {abi.ip_be(a).to_bytes(4, "little") for a in addrs}
        )

    def set_node_addrs(self, addrs: list[str]) -> None:
        """Replace the node's own addresses (both families): never a workload's destination."""
        from . import abi

        self._replace_keys(names.MAP_NODE_IPS, {abi.ip6_key(a) for a in addrs})

    def set_port_mtls(self, modes: dict[tuple[str, int], str]) -> None:
        """Replace the per-port PeerAuthentication modes: (workload ip, port) -> mode."""
        from . import abi

        strict = {True: bytes([abi.MTLS_STRICT]), False: bytes([abi.MTLS_PLAINTEXT])}
        self._replace_keys(
            names.MAP_PORT_MTLS,
            {
                bytes(abi.IpPort(abi.ip_be(ip), port, 0)): strict[mode == "STRICT"]
                for (ip, port), mode in modes.items()
            },
        )

    def set_mesh_ports(self, ports: list[int]) -> None:
        """Replace the mesh's own ports: never a workload's destination."""
        self._replace_keys(names.MAP_MESH_PORTS, {int(p).to_bytes(2, "little") for p in ports})

    def _replace_keys(self, map_name: str, want: set[bytes] | dict[bytes, bytes]) -> None:
        """Make a map hold exactly the keys in want: a set (value 1 each, a set-like map) or a
        dict of values."""
        values = want if isinstance(want, dict) else dict.fromkeys(want, b"\x01")
        with self.dp.open_map(map_name) as m:
            for k in list(m.keys()):
                if k not in values:
                    m.delete(k)
            for k, v in values.items():
                m.update(k, v)

    def stats(self) -> dict[str, int]:
        """dabba_stats summed over CPUs, by name."""
        from . import abi

        out = {}
        with self.dp.open_map(names.MAP_STATS) as m:
            for st in abi.Stat:
                slots = m.lookup_percpu(abi.ctypes.c_uint32(int(st)))
                out[st.name.lower()] = sum(int.from_bytes(s, "little") for s in slots)
        return out

    def guard_drops(self) -> dict[int, int]:
        """Ingress-guard drops per workload cgroup id."""
        with self.dp.open_map(names.MAP_GUARD_COUNT) as m:
            return {int.from_bytes(k, "little"): int.from_bytes(v, "little") for k, v in m.items()}


def cgroup_id(path: str) -> int:
    """The cgroup v2 id of a cgroup folder (its inode number), checked."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DabbaError(
            f"unknown cgroup path {path}: no such cgroup",
            hint="workload cgroups must exist below the cgroup v2 mount before they are enrolled",
        ) from None
    features.require_cgroup2(path)
    import stat as _stat

    if not _stat.S_ISDIR(st.st_mode):
        raise DabbaError(f"unknown cgroup path {path}: not a cgroup folder")
    return st.st_ino
