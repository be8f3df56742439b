"""The bpf() system call, without bcc.

bcc pulls in LLVM (hundreds of MB, seconds to import); only loading a program
needs it. Everything that runs afterwards -- the tunnel reading the capture
map, a restarted agent adopting pinned objects, ``dabba bpf status`` -- goes
through this module: pinned objects, map elements, program queries and
cgroup links, over ``syscall(SYS_bpf, ...)`` with ``union bpf_attr`` packed by
hand (layouts from ``include/uapi/linux/bpf.h``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_BPF = 321  # x86_64

# enum bpf_cmd
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28

# map update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# enum bpf_attach_type (the ones we use)
BPF_CGROUP_INET_INGRESS = 0
BPF_CGROUP_INET_SOCK_CREATE = 2
BPF_CGROUP_SOCK_OPS = 3
BPF_SK_SKB_STREAM_VERDICT = 5
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP6_SENDMSG = 15
BPF_CGROUP_INET4_GETPEERNAME = 29
BPF_CGROUP_INET6_GETPEERNAME = 30
BPF_SK_LOOKUP = 36
BPF_LSM_MAC = 27
BPF_CGROUP_INET_SOCK_RELEASE = 34

# enum bpf_map_type (the ones we name in status output)
MAP_TYPE_NAMES = {
    1: "hash",
    2: "array",
    5: "percpu_hash",
    6: "percpu_array",
    9: "lru_hash",
    11: "lpm_trie",
    18: "sockhash",
    24: "sk_storage",
    27: "ringbuf",
}
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6

# enum bpf_prog_type (names for status output)
PROG_TYPE_NAMES = {
    8: "cgroup_skb",
    9: "cgroup_sock",
    13: "sock_ops",
    14: "sk_skb",
    18: "cgroup_sock_addr",
    29: "lsm",
    30: "sk_lookup",
}

_ATTR_SIZE = 128


class BPFError(OSError):
    """A bpf() command failed; the message names the command and the object."""


def _bpf(cmd: int, attr: bytes, what: str) -> int:
    buf = ctypes.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    ret = _libc.syscall(SYS_BPF, cmd, buf, _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise BPFError(err, f"{what}: {os.strerror(err)}")
    return ret


def _bpf_buf(cmd: int, attr: bytes, what: str) -> tuple[int, ctypes.Array]:
    """Like _bpf, but returns the attr buffer too (commands that write into it)."""
    buf = ctypes.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    ret = _libc.syscall(SYS_BPF, cmd, buf, _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise BPFError(err, f"{what}: {os.strerror(err)}")
    return ret, buf


def _addr(buf) -> int:
    return ctypes.addressof(buf)


BPF_MAP_CREATE = 0


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, name: str) -> int:
    """Create an unpinned map (used by feature probes); returns its fd."""
    attr = struct.pack("=6I", map_type, key_size, value_size, max_entries, 0, 0)
    attr += struct.pack("=I", 0) + name.encode()[:15].ljust(16, b"\0")
    return _bpf(BPF_MAP_CREATE, attr, f"create {name}")


# ---- pinned objects ------------------------------------------------------------


def obj_get(path: str) -> int:
    """Open the BPF object pinned at path; returns a new fd."""
    p = ctypes.create_string_buffer(path.encode())
    return _bpf(BPF_OBJ_GET, struct.pack("=QII", _addr(p), 0, 0), f"open pinned {path}")


def obj_pin(fd: int, path: str) -> None:
    """Pin the object behind fd at path (the folder must exist on bpffs)."""
    p = ctypes.create_string_buffer(path.encode())
    _bpf(BPF_OBJ_PIN, struct.pack("=QII", _addr(p), fd, 0), f"pin {path}")


# ---- object info -----------------------------------------------------------------


@dataclass(frozen=True)
class MapInfo:
    """What the kernel says of a map (struct bpf_map_info)."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str

    @property
    def type_name(self) -> str:
        return MAP_TYPE_NAMES.get(self.type, str(self.type))


@dataclass(frozen=True)
class ProgInfo:
    """What the kernel says of a program (struct bpf_prog_info)."""

    type: int
    id: int
    tag: str
    name: str
    load_time_ns: int  # since boot

    @property
    def type_name(self) -> str:
        return PROG_TYPE_NAMES.get(self.type, str(self.type))


@dataclass(frozen=True)
class LinkInfo:
    """struct bpf_link_info, for cgroup links."""

    type: int
    id: int
    prog_id: int
    cgroup_id: int
    attach_type: int


def _info(fd: int, size: int, what: str) -> bytes:
    info = ctypes.create_string_buffer(size)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, size, _addr(info)), what)
    return info.raw


def map_info(fd: int) -> MapInfo:
    raw = _info(fd, 88, f"map info of fd {fd}")
    t, i, ks, vs, me, fl = struct.unpack_from("=6I", raw, 0)
    name = raw[24:40].split(b"\0", 1)[0].decode()
    return MapInfo(t, i, ks, vs, me, fl, name)


def prog_info(fd: int) -> ProgInfo:
    raw = _info(fd, 232, f"program info of fd {fd}")
    t, i = struct.unpack_from("=II", raw, 0)
    tag = raw[8:16].hex()
    (load_time,) = struct.unpack_from("=Q", raw, 40)
    name = raw[64:80].split(b"\0", 1)[0].decode()
    return ProgInfo(t, i, tag, name, load_time)


def link_info(fd: int) -> LinkInfo:
    raw = _info(fd, 64, f"link info of fd {fd}")
    t, i, prog_id = struct.unpack_from("=III", raw, 0)
    cgroup_id, attach_type = struct.unpack_from("=QI", raw, 16)
    return LinkInfo(t, i, prog_id, cgroup_id, attach_type)


# ---- attachments -------------------------------------------------------------------


def prog_query(target_fd: int, attach_type: int, what: str = "") -> list[int]:
    """IDs of the programs attached to a cgroup (or sockmap) for attach_type."""
    ids = (ctypes.c_uint32 * 64)()
    attr = struct.pack("=IIIIQI", target_fd, attach_type, 0, 0, _addr(ids), 64)
    _, buf = _bpf_buf(BPF_PROG_QUERY, attr, f"query attachments {what}".strip())
    (cnt,) = struct.unpack_from("=I", buf.raw, 24)
    return list(ids[:cnt])


def link_create(prog_fd: int, target_fd: int, attach_type: int, what: str) -> int:
    """Attach prog through a bpf_link (detached when its last ref goes): to a cgroup or a
    network namespace (target_fd), or to its LSM hook (BPF_LSM_MAC, target_fd 0)."""
    attr = struct.pack("=IIII", prog_fd, target_fd, attach_type, 0)
    return _bpf(BPF_LINK_CREATE, attr, f"attach {what}")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, what: str) -> None:
    """Legacy attach: used for the sockmap verdict (no bpf_link on older kernels)."""
    attr = struct.pack("=IIII", target_fd, prog_fd, attach_type, 0)
    _bpf(BPF_PROG_ATTACH, attr, f"attach {what}")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int, what: str) -> None:
    attr = struct.pack("=IIII", target_fd, prog_fd, attach_type, 0)
    _bpf(BPF_PROG_DETACH, attr, f"detach {what}")


# ---- map elements ----------------------------------------------------------------------


class Map:
    """A map opened by fd, with raw-bytes element access.

    Keys and values are ``bytes`` of the map's key and value size (or ctypes
    structures, which are converted). For per-CPU maps a value holds one
    slot per possible CPU, each rounded up to 8 bytes, as the kernel wants.
    """

    def __init__(self, fd: int, name: str = ""):
        self.fd = fd
        self.info = map_info(fd)
        self.name = name or self.info.name
        self.percpu = self.info.type in (BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PERCPU_HASH)
        self.ncpus = possible_cpus() if self.percpu else 1
        self.value_stride = (self.info.value_size + 7) & ~7 if self.percpu else self.info.value_size

    @classmethod
    def pinned(cls, path: str) -> Map:
        return cls(obj_get(path), os.path.basename(path))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _key(self, key) -> ctypes.Array:
        b = bytes(key)
        if len(b) != self.info.key_size:
            raise ValueError(f"{self.name}: key is {len(b)} bytes, map wants {self.info.key_size}")
        return ctypes.create_string_buffer(b, len(b))

    def lookup(self, key) -> bytes | None:
        k = self._key(key)
        v = ctypes.create_string_buffer(self.value_stride * self.ncpus)
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, struct.pack("=IIQQ", self.fd, 0, _addr(k), _addr(v)), "")
        except BPFError as e:
            if e.errno == errno.ENOENT:
                return None
            raise BPFError(e.errno, f"lookup in {self.name}: {os.strerror(e.errno)}") from None
        return v.raw

    def lookup_percpu(self, key) -> list[bytes]:
        raw = self.lookup(key)
        if raw is None:
            return []
        s = self.value_stride
        return [raw[i * s : i * s + self.info.value_size] for i in range(self.ncpus)]

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        k = self._key(key)
        b = bytes(value)
        v = ctypes.create_string_buffer(b, max(len(b), 1))
        attr = struct.pack("=IIQQQ", self.fd, 0, _addr(k), _addr(v), flags)
        _bpf(BPF_MAP_UPDATE_ELEM, attr, f"update {self.name}")

    def delete(self, key) -> bool:
        k = self._key(key)
        try:
            _bpf(BPF_MAP_DELETE_ELEM, struct.pack("=IIQ", self.fd, 0, _addr(k)), "")
        except BPFError as e:
            if e.errno == errno.ENOENT:
                return False
            raise BPFError(e.errno, f"delete in {self.name}: {os.strerror(e.errno)}") from None
        return True

    def keys(self) -> Iterator[bytes]:
        """Iterate keys. Entries deleted meanwhile may restart the walk; good enough for listing."""
        ks = self.info.key_size
        nxt = ctypes.create_string_buffer(ks)
        cur = None
        while True:
            attr = struct.pack(
                "=IIQQ", self.fd, 0, _addr(cur) if cur is not None else 0, _addr(nxt)
            )
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, attr, "")
            except BPFError as e:
                if e.errno == errno.ENOENT:
                    return
                raise BPFError(e.errno, f"walk {self.name}: {os.strerror(e.errno)}") from None
            k = nxt.raw
            yield k
            cur = ctypes.create_string_buffer(k, ks)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                yield k, v

    def count(self) -> int:
        return sum(1 for _ in self.keys())


_possible: int | None = None


def possible_cpus() -> int:
    """Number of possible CPUs (per-CPU maps have one slot each)."""
    global _possible
    if _possible is None:
        with open("/sys/devices/system/cpu/possible") as f:
            n = 0
            for part in f.read().strip().split(","):
                lo, _, hi = part.partition("-")
                n = max(n, int(hi or lo) + 1)
        _possible = n
    return _possible


def socket_cookie(sock) -> int:
    """The kernel's cookie of a socket (SO_COOKIE), the key of our socket maps."""
    import socket

    SO_COOKIE = 57
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
