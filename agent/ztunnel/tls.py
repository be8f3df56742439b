"""HBONE's identities and TLS: SNI names for SPIFFE IDs, the peer's identity and serial, the
contexts (TLS 1.3, ALPN h2), the inbound side's per-identity certificates, and whether a leaf
carries a root's signature. The HTTP/2 side is hbone.py's.
"""

from __future__ import annotations

import ssl

from .. import log, spiffe
from ..control import validate

_log = log.get("hbone")

SNI_SUFFIX = "hbone.dabba"


def sni_for(spiffe_id: str) -> str:
    """spiffe://td/ns/N/sa/S -> S.N.hbone.dabba (a host name the server maps back)."""
    parts = spiffe_id.removeprefix("spiffe://").split("/")
    return f"{parts[4]}.{parts[2]}.{SNI_SUFFIX}"


def identity_from_sni(name: str, trust_domain: str) -> str | None:
    if not name or not name.endswith("." + SNI_SUFFIX):
        return None
    sa, _, ns = name[: -len(SNI_SUFFIX) - 1].partition(".")
    ident = spiffe.spiffe_id(trust_domain, ns, sa)
    return ident if validate.workload_identity(ident, trust_domain) else None


# The peer's certificate as OpenSSL decoded it once it verified it (getpeercert(): every
# context here requires and verifies one), not parsed again with cryptography: the tunnel then
# does not load it at all (6 MiB of its resident memory)


def peer_serial(sslobj) -> str | None:
    """The serial (hex, as the control plane records it) of the peer's certificate."""
    cert = sslobj.getpeercert() if sslobj else None
    serial = (cert or {}).get("serialNumber")
    return format(int(serial, 16), "x") if serial else None


def peer_identity(sslobj) -> str | None:
    """The peer's SPIFFE ID: its certificate's one spiffe:// URI SAN; None with none or more."""
    cert = sslobj.getpeercert() if sslobj else None
    ids = [
        v
        for k, v in (cert or {}).get("subjectAltName", ())
        if k == "URI" and v.startswith("spiffe://")
    ]
    return ids[0] if len(ids) == 1 else None


def _base_context(purpose) -> ssl.SSLContext:
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose == "server" else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False  # SPIFFE IDs are checked instead, after the handshake
    ctx.set_alpn_protocols(["h2"])
    return ctx


def client_context(chain_file: str, key_file: str, bundle_pem: bytes) -> ssl.SSLContext:
    ctx = _base_context("client")
    ctx.load_verify_locations(cadata=bundle_pem.decode())
    ctx.load_cert_chain(chain_file, key_file)
    return ctx


def signed_by_any(der: bytes | None, bundle_pem: bytes) -> bool:
    """Whether a leaf certificate (DER) carries the signature of one of the bundle's roots.

    For what the TLS stack cannot do once a connection is up: tell whether it was verified
    against a root that has since been retired. A leaf signed by an intermediate (a plug-in
    CA) is not signed by a root itself: False, so such connections are renewed too. The one
    place the tunnel needs an X.509 library (a signature to check): only when a root retires."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    if not der:
        return False
    leaf = x509.load_der_x509_certificate(der)
    for root in x509.load_pem_x509_certificates(bundle_pem):
        if root.subject != leaf.issuer:
            continue
        try:
            root.public_key().verify(
                leaf.signature,
                leaf.tbs_certificate_bytes,
                ec.ECDSA(leaf.signature_hash_algorithm),
            )
            return True
        except Exception:  # noqa: BLE001 (another key, another algorithm: not this root)
            continue
    return False


class ServerIdentities:
    """The inbound side's certificates: one TLS context per local workload identity, chosen by SNI."""

    def __init__(self, trust_domain: str, bundle_pem: bytes):
        self.trust_domain = trust_domain
        self.bundle_pem = bundle_pem
        self.contexts: dict[str, ssl.SSLContext] = {}
        self.default = _base_context("server")
        self.default.load_verify_locations(cadata=bundle_pem.decode())
        self.default.sni_callback = self._pick

    def set(self, spiffe_id: str, chain_file: str, key_file: str) -> None:
        ctx = _base_context("server")
        ctx.load_verify_locations(cadata=self.bundle_pem.decode())
        ctx.load_cert_chain(chain_file, key_file)
        self.contexts[spiffe_id] = ctx

    def _pick(self, sslobj, name, _ctx):
        ident = identity_from_sni(name, self.trust_domain)
        ctx = self.contexts.get(ident) if ident else None
        if ctx is None:
            _log.warning(
                "inbound TLS for an identity this node does not hold", fields={"sni": name}
            )
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sslobj.context = ctx
        return None
