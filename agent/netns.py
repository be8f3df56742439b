"""Enter another network namespace on the calling thread, briefly: what a socket created there
belongs to (the tunnel's 15006 listener in a workload's namespace, the agent's inet_diag socket
that ends a workload's connection)."""

from __future__ import annotations

import contextlib
import ctypes
import os

_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def entered(netns: str):
    """Run the block in the network namespace at path netns (this thread only), then come back;
    a thread that cannot come back aborts the process rather than go on in the wrong one."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(netns, os.O_RDONLY)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns {netns}: {os.strerror(err)}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if libc.setns(own, _CLONE_NEWNET) != 0:  # never stay in the workload's namespace
                os.abort()
    finally:
        os.close(own)
