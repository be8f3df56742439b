"""The mesh CA: ECDSA P-256, SPIFFE X.509 SVIDs from CSRs, a trust bundle of several roots.

State (``<state>/ca/``, written atomically, keys 0600)::

    signing-key.pem     the key that signs workload and node certificates
    signing-cert.pem    its certificate (the root itself when self-signed)
    chain.pem           signing cert up to (excluding) the root, for plug-in CAs
    bundle.pem          every trusted root (more than one during a rotation)
    meta.json           trust domain, mode (self-signed | plugin), pending rotation
    next-key.pem, next-cert.pem   during a rotation: the new root, trusted but not yet signing
    serials.log         one JSON line per issued certificate (serial, identity, node, not_after)

Plug-in mode reads Istio's ``cacerts`` layout from a folder: ``ca-cert.pem``,
``ca-key.pem``, ``cert-chain.pem``, ``root-cert.pem``.

Keys of workloads never come here: the node makes them and sends a CSR,
which must carry exactly the one SPIFFE URI the node is allowed to ask for.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import threading
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .. import log
from ..errors import DabbaError
from ..spiffe import node_spiffe_id, spiffe_id  # noqa: F401 (the CA's callers name them here)
from .store import atomic_write, read_text

_log = log.get("ca")

DEFAULT_WORKLOAD_TTL = datetime.timedelta(hours=24)
DEFAULT_ROTATION_OVERLAP_S = 15.0  # new root trusted everywhere before it signs
DEFAULT_ROOT_TTL = datetime.timedelta(days=3650)
CLOCK_SKEW = datetime.timedelta(seconds=60)


class CSRError(DabbaError):
    """A CSR that cannot be signed; the message says why."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_csr(key, uri: str) -> bytes:
    """A CSR for one SPIFFE URI (what a node sends for a workload or itself)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def spiffe_ids_of(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith("spiffe://")
    ]


def validate_csr(pem: bytes, expected_uri: str) -> x509.CertificateSigningRequest:
    """Parse and check a CSR: valid signature, an EC P-256 key, exactly expected_uri as its only SAN."""
    try:
        csr = x509.load_pem_x509_csr(pem)
    except (ValueError, TypeError):
        raise CSRError("CSR is not a PEM certificate request") from None
    try:
        ok = csr.is_signature_valid
    except (InvalidSignature, ValueError):
        ok = False
    if not ok:
        raise CSRError("CSR signature does not verify with its public key")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise CSRError(
            f"CSR key must be ECDSA P-256, not {type(key).__name__.replace('_', '')}"
            + (f" on {key.curve.name}" if isinstance(key, ec.EllipticCurvePublicKey) else "")
        )
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CSRError(f"CSR has no subjectAltName; it must name exactly {expected_uri}") from None
    names = list(san)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(names) != 1 or uris != [expected_uri]:
        shown = ", ".join(str(getattr(n, "value", n)) for n in names)
        raise CSRError(
            f"CSR must name exactly one identity, {expected_uri}; it names {len(names)}: {shown}"
        )
    return csr


@dataclass(frozen=True)
class Issued:
    """A signed certificate with the chain to send along (leaf first, root excluded)."""

    cert: x509.Certificate
    chain_pem: bytes  # leaf + intermediates
    serial: int
    not_after: datetime.datetime


class CA:
    """The signing CA and the trust bundle; thread-safe."""

    def __init__(
        self,
        state_dir: str,
        trust_domain: str,
        key,
        cert: x509.Certificate,
        chain: list[x509.Certificate],
        roots: list[x509.Certificate],
        mode: str,
        workload_ttl: datetime.timedelta = DEFAULT_WORKLOAD_TTL,
    ):
        self.dir = os.path.join(state_dir, "ca")
        self.trust_domain = trust_domain
        self.key = key
        self.cert = cert
        self.chain = chain
        self.roots = roots
        self.mode = mode
        self.workload_ttl = workload_ttl
        self._lock = threading.Lock()
        self.next_key = None  # a rotation in progress: the new root, in the bundle, not yet signing
        self.next_cert: x509.Certificate | None = None
        self.activate_at: float | None = None

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def load_or_create(
        cls,
        state_dir: str,
        trust_domain: str,
        plugin_dir: str | None = None,
        workload_ttl: datetime.timedelta = DEFAULT_WORKLOAD_TTL,
    ) -> CA:
        d = os.path.join(state_dir, "ca")
        if plugin_dir:
            ca = cls._from_plugin(state_dir, trust_domain, plugin_dir, workload_ttl)
        elif os.path.exists(os.path.join(d, "signing-key.pem")):
            ca = cls._load(state_dir, workload_ttl)
            if ca.trust_domain != trust_domain:
                raise DabbaError(
                    f"the CA in {d} is for trust domain {ca.trust_domain!r}, not {trust_domain!r}",
                    hint="use another --state-dir, or the same --trust-domain as before",
                )
            return ca
        else:
            key = new_key()
            root = _self_signed_root(key, trust_domain)
            ca = cls(state_dir, trust_domain, key, root, [], [root], "self-signed", workload_ttl)
            _log.info(
                "created a self-signed root CA",
                fields={"trust_domain": trust_domain, "fingerprint": fingerprint(root)},
            )
        ca.save()
        return ca

    @classmethod
    def _load(cls, state_dir: str, workload_ttl) -> CA:
        d = os.path.join(state_dir, "ca")
        meta = json.loads(read_text(os.path.join(d, "meta.json")))
        key = serialization.load_pem_private_key(
            read_text(os.path.join(d, "signing-key.pem")).encode(), None
        )
        cert = x509.load_pem_x509_certificate(
            read_text(os.path.join(d, "signing-cert.pem")).encode()
        )
        chain_path = os.path.join(d, "chain.pem")
        chain = (
            x509.load_pem_x509_certificates(read_text(chain_path).encode())
            if os.path.getsize(chain_path)
            else []
        )
        roots = x509.load_pem_x509_certificates(read_text(os.path.join(d, "bundle.pem")).encode())
        ca = cls(
            state_dir, meta["trust_domain"], key, cert, chain, roots, meta["mode"], workload_ttl
        )
        if meta.get("activate_at") is not None:
            ca.next_key = serialization.load_pem_private_key(
                read_text(os.path.join(d, "next-key.pem")).encode(), None
            )
            ca.next_cert = x509.load_pem_x509_certificate(
                read_text(os.path.join(d, "next-cert.pem")).encode()
            )
            ca.activate_at = float(meta["activate_at"])
        return ca

    @classmethod
    def _from_plugin(cls, state_dir, trust_domain, plugin_dir, workload_ttl) -> CA:
        def load(name):
            p = os.path.join(plugin_dir, name)
            try:
                return read_text(p).encode()
            except OSError as e:
                raise DabbaError(
                    f"plug-in CA: cannot read {p}: {e.strerror}",
                    hint="expected Istio's cacerts files: ca-cert.pem, ca-key.pem, cert-chain.pem, "
                    "root-cert.pem",
                ) from None

        try:
            cert = x509.load_pem_x509_certificate(load("ca-cert.pem"))
            key = serialization.load_pem_private_key(load("ca-key.pem"), None)
            chain = x509.load_pem_x509_certificates(load("cert-chain.pem"))
            roots = x509.load_pem_x509_certificates(load("root-cert.pem"))
        except ValueError as e:
            raise DabbaError(f"plug-in CA in {plugin_dir}: {e}") from None
        if key.public_key().public_numbers() != cert.public_key().public_numbers():
            raise DabbaError(f"plug-in CA in {plugin_dir}: ca-key.pem does not match ca-cert.pem")
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not bc.ca:
            raise DabbaError(f"plug-in CA in {plugin_dir}: ca-cert.pem is not a CA certificate")
        # cert-chain.pem is ca-cert first, then intermediates; drop a trailing root
        inter = [c for c in chain if c != cert and c not in roots]
        _verify_chain([cert, *inter], roots, f"plug-in CA in {plugin_dir}")
        return cls(state_dir, trust_domain, key, cert, inter, roots, "plugin", workload_ttl)

    def save(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        atomic_write(os.path.join(self.dir, "signing-key.pem"), key_pem(self.key), mode=0o600)
        atomic_write(os.path.join(self.dir, "signing-cert.pem"), cert_pem(self.cert))
        atomic_write(os.path.join(self.dir, "chain.pem"), b"".join(cert_pem(c) for c in self.chain))
        atomic_write(os.path.join(self.dir, "bundle.pem"), self.bundle_pem())
        if self.next_cert is not None:
            atomic_write(os.path.join(self.dir, "next-key.pem"), key_pem(self.next_key), mode=0o600)
            atomic_write(os.path.join(self.dir, "next-cert.pem"), cert_pem(self.next_cert))
        else:
            for f in ("next-key.pem", "next-cert.pem"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.dir, f))
        meta = {
            "trust_domain": self.trust_domain,
            "mode": self.mode,
            "activate_at": self.activate_at,
        }
        atomic_write(os.path.join(self.dir, "meta.json"), json.dumps(meta).encode())

    # ---- the trust bundle --------------------------------------------------------------------

    def bundle_pem(self) -> bytes:
        return b"".join(cert_pem(r) for r in self.roots)

    def rotate(self, overlap_s: float = DEFAULT_ROTATION_OVERLAP_S) -> x509.Certificate:
        """Start a root rotation, in two phases, so that no connection fails:

        1. now: a new root joins the trust bundle (every node learns to trust it), while the
           old root goes on signing;
        2. after overlap_s (maybe_activate(), run by the control plane): the new root signs,
           and nodes re-issue their certificates.
        The old root stays trusted until retire().
        """
        if self.mode != "self-signed":
            raise DabbaError(
                "a plug-in CA is rotated by replacing its cacerts files, not by `ca rotate`"
            )
        with self._lock:
            if self.next_cert is not None:
                raise DabbaError(
                    f"a rotation is already in progress (new root {fingerprint(self.next_cert)} "
                    "signs once it is active)"
                )
            key = new_key()
            root = _self_signed_root(key, self.trust_domain)
            self.next_key, self.next_cert = key, root
            self.activate_at = time.time() + overlap_s
            self.roots = [*self.roots, root]
            self.save()
        _log.info(
            "root rotation started: new root trusted now, signing later",
            fields={"new": fingerprint(root), "roots": len(self.roots), "overlap_s": overlap_s},
        )
        return root

    def maybe_activate(self, now: float | None = None) -> bool:
        """Phase 2 of a rotation, once its overlap has passed; True when the signing root changed."""
        with self._lock:
            if self.next_cert is None or (now or time.time()) < self.activate_at:
                return False
            self.key, self.cert, self.chain = self.next_key, self.next_cert, []
            self.next_key = self.next_cert = self.activate_at = None
            self.save()
        _log.info("new root signs from now on", fields={"signing": fingerprint(self.cert)})
        return True

    def signing_root(self) -> x509.Certificate:
        return self.chain[-1] if self.chain else self.cert

    def retire(self) -> list[str]:
        """End a rotation: drop every root but the signing one; returns the retired fingerprints."""
        with self._lock:
            if self.next_cert is not None:
                raise DabbaError(
                    "the rotation is not active yet: the new root does not sign so far",
                    hint="wait for the overlap to pass (see `dabba control ca show`)",
                )
            signing_root = self.chain[-1] if self.chain else self.cert
            gone = [r for r in self.roots if r != signing_root and self.mode == "self-signed"]
            if not gone:
                return []
            self.roots = [r for r in self.roots if r not in gone]
            self.save()
        fps = [fingerprint(r) for r in gone]
        _log.info("retired old roots", fields={"retired": ",".join(fps)})
        return fps

    # ---- issuance ------------------------------------------------------------------------------

    def issue(self, csr_pem: bytes, uri: str, ttl: datetime.timedelta | None = None) -> Issued:
        """Sign a CSR that names exactly uri (validated first)."""
        return self.issue_validated(validate_csr(csr_pem, uri), uri, ttl)

    def issue_validated(
        self, csr: x509.CertificateSigningRequest, uri: str, ttl: datetime.timedelta | None = None
    ) -> Issued:
        """Sign a CSR that validate_csr(csr, uri) accepted."""
        return self._sign(csr.public_key(), uri, ttl or self.workload_ttl, ())

    def issue_server(
        self, uri: str, names: list[str], ttl: datetime.timedelta
    ) -> tuple[Issued, bytes]:
        """A serving certificate for the control plane itself: (issued, key PEM)."""
        key = new_key()
        return self._sign(key.public_key(), uri, ttl, names), key_pem(key)

    def _sign(self, public_key, uri: str, ttl: datetime.timedelta, names) -> Issued:
        import ipaddress

        now = _now()
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        with self._lock:
            not_after = min(now + ttl, self.cert.not_valid_after_utc)
            serial = x509.random_serial_number()
            cert = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([]))
                .issuer_name(self.cert.subject)
                .public_key(public_key)
                .serial_number(serial)
                .not_valid_before(now - CLOCK_SKEW)
                .not_valid_after(not_after)
                .add_extension(x509.SubjectAlternativeName(sans), critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True,
                        key_encipherment=True,
                        content_commitment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=False,
                        crl_sign=False,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(
                    x509.ExtendedKeyUsage(
                        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                    ),
                    critical=False,
                )
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                    critical=False,
                )
                .add_extension(
                    x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
                )
                .sign(self.key, hashes.SHA256())
            )
            # leaf, then the signing CA and intermediates when the signer is not a root itself
            above = [] if self.mode == "self-signed" else [self.cert, *self.chain]
            chain = cert_pem(cert) + b"".join(cert_pem(c) for c in above)
        return Issued(cert, chain, serial, not_after)


def _self_signed_root(key, trust_domain: str) -> x509.Certificate:
    now = _now()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dabbawala"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"dabbawala root {trust_domain} {now:%Y%m%d%H%M%S%f}"
            ),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + DEFAULT_ROOT_TTL)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def _verify_chain(chain: list[x509.Certificate], roots: list[x509.Certificate], what: str) -> None:
    """Each cert is signed by the next; the last by one of the roots."""
    for child, parent in zip(chain, chain[1:] + [None], strict=True):
        issuers = (
            [parent] if parent is not None else [r for r in roots if r.subject == child.issuer]
        )
        for iss in issuers:
            try:
                child.verify_directly_issued_by(iss)
                break
            except (ValueError, TypeError, InvalidSignature):
                continue
        else:
            raise DabbaError(
                f"{what}: {child.subject.rfc4514_string() or 'a certificate'} is not signed by "
                f"{'the next certificate in the chain' if parent is not None else 'any root'}"
            )


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()[:16]


def verify_svid(chain: list[x509.Certificate], roots: list[x509.Certificate]) -> None:
    """Check a presented chain (leaf first) against the trust bundle; raises DabbaError."""
    _verify_chain(chain, roots, "certificate")
    now = _now()
    for c in chain:
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise DabbaError(
                f"certificate {spiffe_ids_of(c) or c.subject.rfc4514_string()} is expired or not yet "
                "valid"
            )
