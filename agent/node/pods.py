"""Where a Kubernetes pod lives on this node: its cgroup v2 folder and network namespace.

The Kubernetes registry source knows a pod by its UID, not by its cgroup; the kubelet names the
pod's cgroup after the UID, below the kubepods cgroup (the agent's ``cgroup``):

- systemd driver: ``kubepods.slice/[kubepods-<qos>.slice/]kubepods[-<qos>]-pod<uid, - as _>.slice``
- cgroupfs driver: ``kubepods/[<qos>/]pod<uid>``

(``<qos>`` is ``burstable`` or ``besteffort``; Guaranteed pods sit directly below kubepods.)

The pod's network namespace is that of any process in the pod's cgroup tree (every container of
a pod shares its sandbox's namespace). A stable name for it is preferred: the runtime's
``/var/run/netns/cni-...`` entry with the same inode, when it is mounted; else
``/proc/<pid>/ns/net`` of the oldest process (the sandbox's pause process).
"""

from __future__ import annotations

import os

QOS = ("burstable", "besteffort")


def _pod_names(uid: str) -> set[str]:
    u = uid.replace("-", "_")
    return {
        f"pod{uid}",  # cgroupfs
        f"kubepods-pod{u}.slice",  # systemd, Guaranteed
        *(f"kubepods-{q}-pod{u}.slice" for q in QOS),  # systemd, Burstable / BestEffort
    }


def pod_cgroup(root: str, uid: str) -> str | None:
    """The pod's cgroup folder below root (the kubepods cgroup), or None when it has none here."""
    if not uid or "/" in uid or uid.startswith("."):
        return None
    names = _pod_names(uid)
    for parent in (root, *(os.path.join(root, q) for q in QOS),
                   *(os.path.join(root, f"kubepods-{q}.slice") for q in QOS)):  # fmt: skip
        for name in names:
            path = os.path.join(parent, name)
            if os.path.isdir(path):
                return path
    return None


def _pids(cgroup: str) -> list[int]:
    """Every process in cgroup and below, oldest (lowest start time) first."""
    pids = []
    for dirpath, _dirs, files in os.walk(cgroup):
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids.extend(int(x) for x in f.read().split())
        except OSError:
            continue

    def started(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[19])
        except (OSError, IndexError, ValueError):
            return 1 << 62

    return sorted(pids, key=started)


def pod_netns(cgroup: str, netns_dir: str = "/var/run/netns") -> str | None:
    """A path to the network namespace of the processes in cgroup, or None when it has none."""
    try:
        own = os.stat("/proc/self/ns/net")
    except OSError:
        own = None
    for pid in _pids(cgroup):
        path = f"/proc/{pid}/ns/net"
        try:
            st = os.stat(path)
        except OSError:
            continue  # gone since it was listed
        if own is not None and (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            return None  # the node's own namespace (a host-network pod): never the pod's
        try:
            entries = sorted(os.listdir(netns_dir))
        except OSError:
            entries = []
        for e in entries:
            p = os.path.join(netns_dir, e)
            try:
                s = os.stat(p)
            except OSError:
                continue
            if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
                return p
        return path
    return None
