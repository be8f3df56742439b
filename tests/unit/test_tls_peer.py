"""The peer's identity and serial as the tunnel reads them: from OpenSSL's own decoding of the
certificate it verified (no second parse with cryptography), over real TLS 1.3 handshakes with
certificates from the mesh's CA."""

import datetime
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from agent.control import ca as camod
from agent.ztunnel import tls

TD = "cluster.local"


def _files(tmp_path, name: str, chain_pem: bytes, key) -> tuple[str, str]:
    chain, key_file = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    chain.write_bytes(chain_pem)
    key_file.write_bytes(camod.key_pem(key))
    return str(chain), str(key_file)


def _issue(ca, tmp_path, name: str, ident: str):
    key = camod.new_key()
    issued = ca.issue(camod.make_csr(key, ident), ident)
    return _files(tmp_path, name, issued.chain_pem, key), issued.chain_pem


def _handshake(server_files, client_files, bundle: bytes) -> ssl.SSLObject:
    """A TLS 1.3 handshake in memory; returns the server's side (its peer: the client)."""
    sctx = tls._base_context("server")
    sctx.load_verify_locations(cadata=bundle.decode())
    sctx.load_cert_chain(*server_files)
    cctx = tls.client_context(*client_files, bundle)
    bufs = [ssl.MemoryBIO() for _ in range(4)]
    s = sctx.wrap_bio(bufs[0], bufs[1], server_side=True)
    c = cctx.wrap_bio(bufs[2], bufs[3], server_hostname="x.hbone.dabba")
    for _ in range(10):
        for side, out, into in ((c, bufs[3], bufs[0]), (s, bufs[1], bufs[2])):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            into.write(out.read())
    s.do_handshake()
    return s


def test_the_peers_identity_and_serial_are_those_of_its_verified_certificate(tmp_path):
    ca = camod.CA.load_or_create(str(tmp_path / "ca"), TD)
    web = camod.spiffe_id(TD, "shop", "web")
    server, _ = _issue(ca, tmp_path, "srv", camod.spiffe_id(TD, "shop", "api"))
    client, chain_pem = _issue(ca, tmp_path, "cli", web)
    s = _handshake(server, client, ca.bundle_pem())
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    assert tls.peer_identity(s) == web == camod.spiffe_ids_of(leaf)[0]
    assert tls.peer_serial(s) == format(leaf.serial_number, "x")


def test_a_certificate_with_two_spiffe_ids_or_none_proves_no_identity(tmp_path):
    ca = camod.CA.load_or_create(str(tmp_path / "ca"), TD)
    server, _ = _issue(ca, tmp_path, "srv", camod.spiffe_id(TD, "shop", "api"))
    now = datetime.datetime.now(datetime.UTC)
    for name, uris in (
        ("two", ["spiffe://cluster.local/ns/a/sa/x", "spiffe://cluster.local/ns/b/sa/y"]),
        ("none", ["https://example.com/x"]),
    ):
        key = camod.new_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                critical=True,
            )
            .sign(ca.key, hashes.SHA256())
        )
        client = _files(
            tmp_path,
            name,
            cert.public_bytes(Encoding.PEM) + ca.cert.public_bytes(Encoding.PEM),
            key,
        )
        s = _handshake(server, client, ca.bundle_pem())
        assert tls.peer_identity(s) is None, name
        assert tls.peer_serial(s) == format(cert.serial_number, "x")
