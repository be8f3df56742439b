"""SPIFFE IDs as the mesh writes them: one place, imported by the control plane's CA and by the
node, which must not import the CA (its X.509 library; see agent/node/keygen.py)."""

from __future__ import annotations


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """A workload's identity, Istio's form."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def node_spiffe_id(trust_domain: str, node: str) -> str:
    """A node's own identity; not of the workload form, so it can never pass as one."""
    return f"spiffe://{trust_domain}/node/{node}"


def trust_domain(uri: str) -> str:
    """spiffe://<trust domain>/... -> the trust domain."""
    return uri.removeprefix("spiffe://").split("/", 1)[0]
