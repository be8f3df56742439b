"""systemd's notify protocol (sd_notify(3)) without libsystemd: readiness, watchdog, status.

Under a unit with ``Type=notify`` systemd sets ``$NOTIFY_SOCKET``; with
``WatchdogSec=`` it also sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) and
restarts the service when no ``WATCHDOG=1`` arrives in time. Outside systemd
every call is a no-op, so the same code runs in a lab, a pod or a unit.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

from . import log

_log = log.get("systemd")


def notify(*lines: str) -> bool:
    """Send "READY=1", "STATUS=...", "WATCHDOG=1", "STOPPING=1"...; False when not under systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    # non-blocking: a notify socket that nobody reads must never stall the service
    with socket.socket(
        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
    ) as s:
        try:
            s.connect(path)
            s.send("\n".join(lines).encode())
        except BlockingIOError:
            _log.warning(f"sd_notify to {path!r}: its queue is full, {lines[0]} dropped")
            return False
        except OSError as e:
            _log.warning(f"sd_notify to {path!r} failed: {e}")
            return False
    return True


def watchdog_interval() -> float | None:
    """How often to send WATCHDOG=1 (half of WatchdogSec=), or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        n = int(usec)
    except ValueError:
        return None
    return n / 2e6 if n > 0 else None


async def watchdog(healthy: Callable[[], str | None]) -> None:
    """Send WATCHDOG=1 every half period while healthy() returns None.

    healthy() returns a reason when the process is stuck (a dead thread, a
    stale loop); then no ping goes out and systemd restarts the service once
    WatchdogSec= has passed, which is the point of a watchdog.
    """
    every = watchdog_interval()
    if every is None:
        return
    while True:
        why = healthy()
        if why is None:
            notify("WATCHDOG=1")
        else:
            _log.error(f"not pinging the watchdog: {why}")
        await asyncio.sleep(every)
