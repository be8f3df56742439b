"""Loaders: one object per hook (load, attach, detach, adopt), and a node's datapath.

Pin layout of a node (``<bpffs>/dabba/<node>/``)::

    maps/<map>      every map (include/maps.h), created by the first program
    progs/<prog>    every program
    links/<prog>    the bpf_link attaching a cgroup program to the node cgroup (own.c: to the
                    node's namespace; tunops.c: to the tunnel's cgroup)
    links/<prog>_<netns inode>   plain.c's link to a workload's namespace

What the agent writes into the maps at run time is control.py's (DatapathControl).
A pinned link keeps its program attached with no process holding it, so
capture and accounting go on while the agent is down. A restarted agent
finds the pins and adopts them through the bpf() syscall alone: no compile,
no second attachment. bcc is imported only when something must be compiled.
"""

from __future__ import annotations

import contextlib
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
PROG_LSM = 29


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
    out = json.loads(r.stdout)
    for function, why in out["failed"].items():
        _log.warning(f"{function} not loaded: this kernel refused it", fields={"bcc": why})
    return out["seconds"]


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
    ring_pages: int = 256  # 1 MiB: about 6,500 closed flows (1,000 connections ending at once)
    splice: int = 16384  # no map uses it since the sockmap splice went; kept for old configs
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
    optional = False  # a kernel may lack its hook: the datapath works without it (ensure())

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
            "optional": self.optional,
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


class ReleaseProgram(Program):
    """cgroup/sock_release: gives back a released socket's capture slot and record (sock.c)."""

    source = "sock.c"
    function = names.PROG_SOCK_RELEASE
    hook = "cgroup/sock_release"
    prog_type = PROG_CGROUP_SOCK
    expected_attach = bpfsys.BPF_CGROUP_INET_SOCK_RELEASE
    attach_type = bpfsys.BPF_CGROUP_INET_SOCK_RELEASE


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


class PeerProgram(Program):
    """cgroup/getpeername4: a resolved or captured socket's peer is what it asked for (peer.c)."""

    source = "peer.c"
    function = names.PROG_PEER4
    hook = "cgroup/getpeername4"
    prog_type = PROG_CGROUP_SOCK_ADDR
    expected_attach = bpfsys.BPF_CGROUP_INET4_GETPEERNAME
    attach_type = bpfsys.BPF_CGROUP_INET4_GETPEERNAME


class Peer6Program(PeerProgram):
    """cgroup/getpeername6: the same for AF_INET6 sockets (peer.c)."""

    function = names.PROG_PEER6
    hook = "cgroup/getpeername6"
    expected_attach = bpfsys.BPF_CGROUP_INET6_GETPEERNAME
    attach_type = bpfsys.BPF_CGROUP_INET6_GETPEERNAME


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


class FamilyProgram(Program):
    """lsm/socket_create: enrolled workloads get no packet or other non-inet network socket
    (family.c).

    Optional: it needs the BPF LSM active (CONFIG_BPF_LSM, "bpf" in lsm=). Where the kernel
    refuses to load or attach it, the datapath goes on without it, counts the failure
    (DABBA_ST_LSM_FAILED: not tried again while the pins last, that is until reboot or
    unload) and the agent decides what that means (capture.packet_sockets). Attached to its
    hook through a pinned link, with no target.
    """

    source = "family.c"
    function = names.PROG_FAMILY
    hook = "lsm/socket_create"
    prog_type = PROG_LSM
    expected_attach = bpfsys.BPF_LSM_MAC
    attach_type = bpfsys.BPF_LSM_MAC
    optional = True

    def attach(self, prog_fd: int, target_fd: int) -> None:
        super().attach(prog_fd, 0)


CGROUP_PROGRAMS = (
    OwnerProgram,
    ReleaseProgram,
    CaptureProgram,
    Capture6Program,
    Sendmsg4Program,
    Sendmsg6Program,
    PeerProgram,
    Peer6Program,
    FlowProgram,
    GuardProgram,
)
ALL_PROGRAMS = CGROUP_PROGRAMS + (
    PlainProgram,
    OwnProgram,
    TunnelOpsProgram,
    FamilyProgram,
)


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
    # attached to namespaces, the tunnel's cgroup or an LSM hook, not the node's cgroup: any
    # count is right
    elsewhere: bool = False
    optional: bool = False  # the kernel may lack its hook (FamilyProgram)


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
        return all(
            p.pinned and (p.attached in (1, -1) or p.elsewhere)
            for p in self.programs
            if p.pinned or not p.optional
        )

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
        if existed:
            self.check_layout()
        for d in (self.pins.maps, self.pins.progs, self.pins.links):
            os.makedirs(d, exist_ok=True)
        reports: list[LoadReport] = []
        try:
            cg = self._cgroup_fd()
            try:
                missing = [p for p in self.programs if not os.path.exists(p.prog_pin)]
                if missing and all(p.optional for p in missing) and self._optional_failed():
                    missing = []  # tried on this boot and refused by the kernel: not again
                compiled = compile_programs(missing, self._cflags()) if missing else {}
                for prog in self.programs:
                    if prog.optional and not os.path.exists(prog.prog_pin):
                        if prog in missing:
                            self._count_optional_failure()
                        continue
                    reports.append(self._ensure_one(prog, cg, compiled.get(prog.function)))
            finally:
                os.close(cg)
        except BaseException:
            if not existed:
                self.remove()
            raise
        return reports

    def check_layout(self) -> None:
        """Refuse to adopt pinned maps whose layout is not this dabbawala's (they were pinned by
        another version: 12-byte 4-tuples before IPv6 was meshed, for one). Reading or writing
        them with this version's types would corrupt what the kernel holds."""
        from . import abi

        for name, (key, value) in abi.map_layouts().items():
            path = self.pins.map_path(name)
            if not os.path.exists(path):
                continue
            with bpfsys.Map.pinned(path) as m:
                have = (m.info.key_size, m.info.value_size)
            if have != (key, value):
                raise DabbaError(
                    f"the datapath pinned for node {self.node} ({self.pins.root}) is from "
                    f"another dabbawala version: map {name} has {have[0]}-byte keys and "
                    f"{have[1]}-byte values, this version's have {key} and {value}; refusing "
                    "to adopt it",
                    hint=f"drain the node's workloads, then `dabba bpf unload --node {self.node}` "
                    "and start the agent again: it loads this version's programs (nothing is "
                    "captured in between)",
                )

    def _ensure_one(self, prog: Program, cgroup_fd: int, compile_s: float | None) -> LoadReport:
        """Attach prog (pinned by now) unless it is attached already.

        compile_s: seconds its compile and load took, None when it was pinned already.
        """
        t0 = time.monotonic()
        action = "adopted" if compile_s is None else "loaded"
        fd = bpfsys.obj_get(prog.prog_pin)
        try:
            info = bpfsys.prog_info(fd)
            if isinstance(prog, PlainProgram | OwnProgram | TunnelOpsProgram):
                pass  # attached elsewhere (steer_plaintext, own_listeners, trust_tunnel_cgroup)
            elif isinstance(prog, FamilyProgram):
                if not os.path.exists(prog.link_pin):
                    self._attach_optional(prog, fd)
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

    def _attach_optional(self, prog: Program, prog_fd: int) -> None:
        """Attach an optional program; where the kernel refuses, unpin it and count that."""
        try:
            prog.attach(prog_fd, -1)
        except bpfsys.BPFError as e:
            _log.warning(f"{prog.hook} not attached: this kernel refused it", fields={"error": e})
            with contextlib.suppress(FileNotFoundError):
                os.unlink(prog.prog_pin)
            self._count_optional_failure()

    def _optional_failed(self) -> bool:
        from . import abi

        with contextlib.suppress(DabbaError):
            from .control import DatapathControl

            return DatapathControl(self).stats().get(abi.Stat.LSM_FAILED.name.lower(), 0) > 0
        return False

    def _count_optional_failure(self) -> None:
        """DABBA_ST_LSM_FAILED += 1 (on the first CPU's slot: the sum is what is read)."""
        from . import abi

        with self.open_map(names.MAP_STATS) as m:
            key = abi.ctypes.c_uint32(int(abi.Stat.LSM_FAILED))
            raw = bytearray(m.lookup(key) or b"\0" * (m.value_stride * m.ncpus))
            raw[0:8] = (int.from_bytes(raw[0:8], "little") + 1).to_bytes(8, "little")
            m.update(key, bytes(raw))

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
        for prog in self.programs:
            prog.detach(None)
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
        try:
            for prog in self.programs:
                ps = ProgramStatus(prog.function, prog.hook, os.path.exists(prog.prog_pin))
                ps.elsewhere = isinstance(
                    prog, PlainProgram | OwnProgram | TunnelOpsProgram | FamilyProgram
                )
                ps.optional = prog.optional
                if ps.pinned:
                    fd = bpfsys.obj_get(prog.prog_pin)
                    try:
                        info = bpfsys.prog_info(fd)
                    finally:
                        os.close(fd)
                    ps.id, ps.tag, ps.loaded_at = info.id, info.tag, info.load_time_ns / 1e9
                    target = cg
                    if isinstance(prog, PlainProgram):
                        ps.attached = prog.netns_links()  # one per steered workload namespace
                    elif isinstance(prog, OwnProgram | TunnelOpsProgram | FamilyProgram):
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
                from .control import DatapathControl

                st.counters = DatapathControl(self).stats()
        finally:
            if cg is not None:
                os.close(cg)
        return st
