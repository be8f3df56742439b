"""What names, namespaces, labels and identities may be, as Kubernetes defines them.

Every name that reaches a path, a certificate or an identity goes through here
first: a namespace is a DNS-1123 label, a workload, service, policy or service
account name a DNS-1123 subdomain, a label key and value what Kubernetes
accepts. Anything else (non-ASCII, ``..``, ``/``, empty, too long) is refused
with the reason, wherever it came from (registry file, Kubernetes object,
control-plane message).
"""

from __future__ import annotations

import re

_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
DNS_LABEL = re.compile(rf"^{_LABEL}$")
DNS_SUBDOMAIN = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
# a node's name: also a file name (tokens, identities) and a pin folder
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def _shown(v: object) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def namespace_error(v: object) -> str | None:
    """Why v is not a namespace (a DNS-1123 label), or None."""
    if isinstance(v, str) and DNS_LABEL.match(v):
        return None
    return (
        f"namespace {_shown(v)} is not a DNS-1123 label (lower-case letters, digits and '-', "
        "at most 63, starting and ending with a letter or digit)"
    )


def name_error(v: object, what: str = "name") -> str | None:
    """Why v is not an object or service account name (a DNS-1123 subdomain), or None."""
    if isinstance(v, str) and DNS_SUBDOMAIN.match(v):
        return None
    return (
        f"{what} {_shown(v)} is not a DNS-1123 subdomain (lower-case letters, digits, '-' and "
        "'.', at most 253, each part starting and ending with a letter or digit)"
    )


def node_error(v: object) -> str | None:
    """Why v is not a node name, or None."""
    if isinstance(v, str) and NODE_NAME.match(v) and ".." not in v:
        return None
    return f"node name {_shown(v)} is not letters, digits, '.', '_' and '-' (at most 63)"


def label_error(key: object, value: object) -> str | None:
    """Why key: value is not a Kubernetes label, or None."""
    if not isinstance(key, str) or not isinstance(value, str):
        return f"label {_shown(key)}: {_shown(value)}: keys and values must be strings"
    prefix, _, name = key.rpartition("/")
    if (prefix and not DNS_SUBDOMAIN.match(prefix)) or not _LABEL_NAME.match(name):
        return f"label key {_shown(key)} is not a Kubernetes label key ([prefix/]name)"
    if not _LABEL_VALUE.match(value):
        return f"label {key}: value {_shown(value)} is not a Kubernetes label value"
    return None


def workload_identity(spiffe_id: str | None, trust_domain: str) -> tuple[str, str] | None:
    """(namespace, service account) when spiffe_id is a workload identity of trust_domain
    (spiffe://<td>/ns/<namespace>/sa/<service account>), else None: node and control-plane
    identities, other trust domains and anything malformed are not workloads."""
    prefix = f"spiffe://{trust_domain}/"
    if not spiffe_id or not spiffe_id.startswith(prefix):
        return None
    parts = spiffe_id[len(prefix) :].split("/")
    if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
        return None
    ns, sa = parts[1], parts[3]
    if namespace_error(ns) or name_error(sa):
        return None
    return ns, sa
