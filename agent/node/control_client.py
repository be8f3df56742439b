"""The node's side of the control plane: join, then talk mutual TLS with the node certificate."""

from __future__ import annotations

from ..control import ca as camod
from ..control.proto import control_pb2 as pb
from ..errors import DabbaError
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
) -> tuple[bytes, pb.NodeCertificate]:
    """Join with a one-time token; returns (node key PEM, node certificate). The key never leaves."""
    key = camod.new_key()
    csr = camod.make_csr(
        key, "spiffe://join/node/" + node
    )  # replaced below, once the trust domain is known
    async with Channel(addr, ca_pem) as ch:
        stub = JoinStub(ch)
        # The CSR must name spiffe://<td>/node/<node>; the trust domain is in the CA's root.
        td = trust_domain_of(ca_pem)
        csr = camod.make_csr(key, camod.node_spiffe_id(td, node))
        try:
            cert = await stub.Join(
                pb.JoinRequest(node=node, token=token, csr_pem=csr, address=address),
                timeout=timeout,
            )
        except RpcError as e:
            raise describe(e, addr) from None
    return camod.key_pem(key), cert


def trust_domain_of(bundle_pem: bytes) -> str:
    from cryptography import x509

    for root in x509.load_pem_x509_certificates(bundle_pem):
        for uri in camod.spiffe_ids_of(root):
            return uri.removeprefix("spiffe://").split("/", 1)[0]
    raise DabbaError("the control plane's CA certificate names no SPIFFE trust domain")
