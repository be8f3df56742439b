"""Registry documents: a YAML document with its node tree (for file:line in every error) and
the strict field readers every kind's parser uses."""

from __future__ import annotations

import yaml

from ..errors import DabbaError
from . import validate


class RegistryError(DabbaError):
    """An invalid document: the message starts with file:line."""


class UnsupportedError(RegistryError):
    """A document valid for Istio that we cannot honour (action CUSTOM, a source field such as
    serviceAccounts): refused on its own, what it selects fails closed (fail_closed())."""


class _Doc:
    """A YAML document with its node tree, for line numbers."""

    def __init__(self, path: str, node: yaml.Node, value):
        self.path, self.node, self.value = path, node, value

    def at(self, *keys) -> str:
        n = self.node
        for k in keys:
            nxt = None
            if isinstance(n, yaml.MappingNode):
                nxt = next((v for kk, v in n.value if kk.value == k), None)
            elif isinstance(n, yaml.SequenceNode) and isinstance(k, int) and k < len(n.value):
                nxt = n.value[k]
            if nxt is None:
                break
            n = nxt
        return f"{self.path}:{n.start_mark.line + 1}"

    def fail(self, keys: tuple, msg: str):
        raise RegistryError(f"{self.at(*keys)}: {msg}")

    def unsupported(self, keys: tuple, msg: str):
        raise UnsupportedError(f"{self.at(*keys)}: {msg}")


def _str_map(doc: _Doc, v, keys: tuple, what: str) -> dict[str, str]:
    """Labels, or a selector of labels: each key and value checked as Kubernetes does."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        doc.fail(keys, f"{what} must be a mapping of strings")
    for k, x in v.items():
        err = validate.label_error(k, x)
        if err:
            doc.fail((*keys, k), f"{what}: {err}")
    return dict(v)


def _str(doc: _Doc, v, keys: tuple, what: str, default: str | None = None) -> str:
    """A string field (YAML makes 80 an int and yes a bool: those are refused, not converted)."""
    if v is None and default is not None:
        return default
    if not isinstance(v, str):
        doc.fail(keys, f"{what} must be a string, not {type(v).__name__} {v!r:.40}")
    return v


def _list(doc: _Doc, v, keys: tuple, what: str) -> list:
    if v is None:
        return []
    if not isinstance(v, list):
        doc.fail(keys, f"{what} must be a list")
    return v


def _port(doc: _Doc, v, keys: tuple, what: str) -> int:
    try:
        p = int(v)
    except (TypeError, ValueError):
        doc.fail(keys, f"{what}: {v!r} is not a port number")
    if not 0 < p < 65536:
        doc.fail(keys, f"{what}: {p} is out of range (1-65535)")
    return p


def _only(doc: _Doc, d: dict, allowed: set, keys: tuple, what: str) -> None:
    for k in d:
        if k not in allowed:
            doc.fail(
                (*keys, k), f"{what}: unknown field {k!r} (known: {', '.join(sorted(allowed))})"
            )


def _meta(doc: _Doc) -> tuple[str, str, dict[str, str]]:
    md = doc.value.get("metadata")
    if not isinstance(md, dict) or not md.get("name"):
        doc.fail(("metadata",), "metadata.name is required")
    name, ns = md["name"], md.get("namespace", "default")
    err = validate.name_error(name, "metadata.name")
    if err:
        doc.fail(("metadata", "name"), err)
    err = validate.namespace_error(ns)
    if err:
        doc.fail(("metadata", "namespace"), f"metadata.{err}")
    return name, ns, _str_map(doc, md.get("labels"), ("metadata", "labels"), "metadata.labels")


def _spec(doc: _Doc) -> dict:
    s = doc.value.get("spec")
    if s is None:
        return {}
    if not isinstance(s, dict):
        doc.fail(("spec",), "spec must be a mapping")
    return s
