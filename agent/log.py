"""Structured logging: every line carries component=, as ztunnel's do."""

from __future__ import annotations

import logging
import os
import sys

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
