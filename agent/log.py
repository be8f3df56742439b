"""Structured logging: every line carries component=, as ztunnel's do."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import time
from collections.abc import Callable

_FMT = "%(asctime)s %(levelname)s component=%(component)s %(message)s"


class _ComponentAdapter(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        fields = kwargs.pop("fields", None)
        if fields:
            msg = msg + " " + " ".join(f"{k}={v}" for k, v in fields.items())
        kwargs.setdefault("extra", {})["component"] = self.extra["component"]
        return msg, kwargs


def get(component: str) -> logging.LoggerAdapter:
    """A logger whose lines say component=<component>."""
    return _ComponentAdapter(logging.getLogger(f"dabba.{component}"), {"component": component})


def setup(level: str | None = None) -> None:
    """Configure the root handler once (stderr; level from DABBA_LOG or argument)."""
    root = logging.getLogger("dabba")
    if root.handlers:
        return
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(_FMT))
    root.addHandler(h)
    root.setLevel((level or os.environ.get("DABBA_LOG", "info")).upper())
    root.propagate = False


class Burst:
    """Logs the first few events of each second in full and counts the rest.

    The count is logged when its second ends, on the running loop's timer, so
    the last burst's count is not lost when no event follows it. ``summary``
    names the events ("HBONE handshakes refused"); ``fields`` gives the
    summary line's fields at the time it is written.
    """

    def __init__(
        self,
        logger: logging.LoggerAdapter,
        summary: str,
        first: int = 5,
        window: float = 1.0,
        fields: Callable[[], dict] | None = None,
    ):
        self._log, self._summary, self._first, self._window = logger, summary, first, window
        self._fields = fields
        self._start, self._logged, self.held = -math.inf, 0, 0
        self._timer: asyncio.TimerHandle | None = None

    def warning(self, msg: str, fields: dict | None = None) -> None:
        now = time.monotonic()
        if now - self._start >= self._window:
            self.flush()
            self._start, self._logged = now, 0
        if self._logged < self._first:
            self._logged += 1
            self._log.warning(msg, fields=fields)
            return
        self.held += 1
        if self._timer is None:
            delay = self._start + self._window - now
            self._timer = asyncio.get_running_loop().call_later(delay, self.flush)

    def flush(self) -> None:
        """Write the count held back, if any (at the second's end, or on close)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.held:
            fields = self._fields() if self._fields else None
            self._log.warning(f"{self.held} more {self._summary} in the last second", fields=fields)
            self.held = 0
