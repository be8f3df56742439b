"""The node's side of the control plane: join, then talk mutual TLS with the node certificate."""

from __future__ import annotations

from .. import certread
from ..control import wire
from ..errors import DabbaError
from ..spiffe import node_spiffe_id, trust_domain
from . import keygen
from .rpc import Channel, JoinStub, RpcError, StatusCode


def describe(e: RpcError, addr: str) -> DabbaError:
    """An operator-facing error for a failed call."""
    code, detail = e.code(), e.details() or ""
    if code == StatusCode.UNAVAILABLE:
        return DabbaError(
            f"the control plane at {addr} is unreachable: {detail}",
            hint=f"is `dabba control serve` running, and is {addr} reachable from this node?",
        )
    return DabbaError(f"control plane {addr} refused: {code.name}: {detail}")


async def join(
    addr: str, ca_pem: bytes, node: str, token: str, address: str, timeout: float = 10.0
) -> tuple[bytes, wire.NodeCertificate]:
    """Join with a one-time token; returns (node key PEM, node certificate). The key never leaves."""
    # the CSR must name spiffe://<td>/node/<node>; the trust domain is in the CA's root
    [(key_pem, csr)] = await keygen.csrs([node_spiffe_id(trust_domain_of(ca_pem), node)])
    async with Channel(addr, ca_pem) as ch:
        stub = JoinStub(ch)
        try:
            cert = await stub.Join(
                wire.JoinRequest(node=node, token=token, csr_pem=csr, address=address),
                timeout=timeout,
            )
        except RpcError as e:
            raise describe(e, addr) from None
    return key_pem, cert


def trust_domain_of(bundle_pem: bytes) -> str:
    try:
        roots = certread.load_pem(bundle_pem)
    except ValueError as e:
        raise DabbaError(f"the control plane's CA certificate cannot be read: {e}") from None
    for root in roots:
        for uri in root.spiffe_ids:
            return trust_domain(uri)
    raise DabbaError("the control plane's CA certificate names no SPIFFE trust domain")
