"""Durable files: atomic replace (write, fsync, rename, fsync the folder) and an append-only log."""

from __future__ import annotations

import json
import os
import stat

# The daemons' (agent, tunnel, control plane) umask: what they create is at most 0640 (files)
# and 0750 (folders), group root; nobody else reads flow identities, logs or keys.
DAEMON_UMASK = 0o027

# In the agent's state folder: {cgroup id: "namespace/name"} of the workloads it enrolled, written
# by the agent, read by the tunnel (which knows a captured connection by that cgroup id).
ENROLLED_FILE = "enrolled.json"


def private_dir(path: str) -> None:
    """Create path 0750, or take group write and every "other" bit from it if it exists."""
    os.makedirs(path, mode=0o750, exist_ok=True)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o027:
        os.chmod(path, mode & ~0o027)


def atomic_write(path: str, data: bytes, mode: int = 0o640) -> None:
    """Replace path with data so that a crash leaves the old or the new file, never a torn one."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def append_record(path: str, record: dict) -> None:
    """Append one JSON line and fsync; a crash can tear only the last line, which load_records skips."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def load_records(path: str) -> list[dict]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue  # a torn last line
    except FileNotFoundError:
        pass
    return out
