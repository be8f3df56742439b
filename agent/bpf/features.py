"""Kernel feature probes: what the datapath needs, checked before anything is created."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import DabbaError

BPFFS_MAGIC = 0xCAFE4A11
CGROUP2_MAGIC = 0x63677270


def _fs_magic(path: str) -> int:
    import ctypes
    import ctypes.util

    class StatFS(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    buf = StatFS()
    if libc.statfs(path.encode(), ctypes.byref(buf)) != 0:
        return -1
    return buf.f_type & 0xFFFFFFFF


def cgroup2_root() -> str:
    """Where cgroup v2 is mounted (hybrid hosts: /sys/fs/cgroup/unified)."""
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return parts[1]
    raise DabbaError(
        "cgroup v2 is not mounted on this host",
        hint="the datapath attaches to cgroup v2; mount it (mount -t cgroup2 none /sys/fs/cgroup/unified)",
    )


def cgroup_of(pid: int | str = "self") -> str:
    """The cgroup v2 folder of a process (its "0::" line in /proc/<pid>/cgroup)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            rel = next(line[3:].strip() for line in f if line.startswith("0::"))
    except (OSError, StopIteration):
        raise DabbaError(f"process {pid} has no cgroup v2 (is it gone?)") from None
    return os.path.join(cgroup2_root(), rel.lstrip("/"))


def require_cgroup2(path: str) -> None:
    if _fs_magic(path) != CGROUP2_MAGIC:
        raise DabbaError(
            f"{path} is not a cgroup v2 directory",
            hint=f"cgroup v2 is mounted at {cgroup2_root()}; workload cgroups must be below it",
        )


def require_bpffs(path: str) -> None:
    if _fs_magic(path) != BPFFS_MAGIC:
        raise DabbaError(
            f"{path} is not on a BPF filesystem (bpffs): programs and maps cannot be pinned there",
            hint="mount it with: mount -t bpf bpf /sys/fs/bpf (make setup does this)",
        )


@dataclass(frozen=True)
class Features:
    """What the running kernel offers, as the agent reports it."""

    kernel: str
    btf: bool
    cgroup2: str | None
    bpffs: bool
    sockmap: bool
    ktls: bool

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _can_create_sockhash() -> bool:
    from . import sys as bpfsys

    try:
        fd = bpfsys.map_create(18, 8, 4, 1, "dabba_probe")
    except OSError:
        return False
    os.close(fd)
    return True


def probe(bpffs_root: str = "/sys/fs/bpf") -> Features:
    """Probe without side effects."""
    try:
        cg = cgroup2_root()
    except DabbaError:
        cg = None
    ktls = False
    try:
        with open("/proc/sys/net/ipv4/tcp_available_ulp") as f:
            ktls = "tls" in f.read().split()
    except OSError:
        pass
    if not ktls:
        # CONFIG_TLS=m: the module exists but is not loaded yet.
        rel = os.uname().release
        ktls = any(
            os.path.exists(f"/lib/modules/{rel}/kernel/net/tls/tls.ko{ext}")
            for ext in ("", ".xz", ".zst")
        )
    return Features(
        kernel=os.uname().release,
        btf=os.path.exists("/sys/kernel/btf/vmlinux"),
        cgroup2=cg,
        bpffs=_fs_magic(bpffs_root) == BPFFS_MAGIC,
        sockmap=_can_create_sockhash(),
        ktls=ktls,
    )


def bpf_lsm_missing() -> str:
    """Why a BPF LSM program does not run here, as far as the kernel says (for messages).

    The active LSMs are listed in securityfs (mounted by systemd; not everywhere).
    """
    try:
        with open("/sys/kernel/security/lsm") as f:
            active = f.read().strip()
    except OSError:
        active = ""
    if active and "bpf" not in active.split(","):
        return (
            f"the BPF LSM is not active (this kernel's LSMs: {active}); boot with lsm={active},bpf"
        )
    return (
        "this kernel refused to load or attach a BPF LSM program (it needs CONFIG_BPF_LSM, "
        '"bpf" in lsm= and BPF trampolines)'
    )
