"""The CA: SVID issuance, CSR validation, persistence, plug-in chains, root rotation."""

import datetime
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.control import ca as camod
from agent.control.ca import CA, CSRError, make_csr, new_key, spiffe_id, validate_csr
from agent.errors import DabbaError

TD = "cluster.local"
WEB = spiffe_id(TD, "shop", "web")


@pytest.fixture
def ca(tmp_path):
    return CA.load_or_create(str(tmp_path), TD)


def test_workload_svid_has_spiffe_san_usage_lifetime_and_chains_to_root(ca):
    key = new_key()
    issued = ca.issue(make_csr(key, WEB), WEB)
    c = issued.cert
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
    assert camod.spiffe_ids_of(c) == [WEB]
    assert c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = c.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    eku = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    life = c.not_valid_after_utc - c.not_valid_before_utc
    assert life == datetime.timedelta(hours=24) + camod.CLOCK_SKEW
    assert c.public_key().public_numbers() == key.public_key().public_numbers()
    c.verify_directly_issued_by(ca.roots[0])
    camod.verify_svid([c], ca.roots)
    assert issued.chain_pem.count(b"BEGIN CERTIFICATE") == 1  # self-signed root: leaf only


def test_configurable_lifetime(tmp_path):
    c = CA.load_or_create(str(tmp_path), TD, workload_ttl=datetime.timedelta(seconds=60))
    cert = c.issue(make_csr(new_key(), WEB), WEB).cert
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(seconds=120)


def _csr(key, names, sign_key=None):
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return b.sign(sign_key or key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_csr_for_another_identity_is_refused(ca):
    other = spiffe_id(TD, "shop", "admin")
    with pytest.raises(CSRError, match=f"exactly one identity, {WEB}; it names 1: {other}"):
        ca.issue(make_csr(new_key(), other), WEB)


def test_csr_with_two_sans_is_refused():
    key = new_key()
    pem = _csr(
        key,
        [
            x509.UniformResourceIdentifier(WEB),
            x509.UniformResourceIdentifier(spiffe_id(TD, "a", "b")),
        ],
    )
    with pytest.raises(CSRError, match="it names 2"):
        validate_csr(pem, WEB)
    pem = _csr(key, [x509.UniformResourceIdentifier(WEB), x509.DNSName("evil.example")])
    with pytest.raises(CSRError, match="it names 2"):
        validate_csr(pem, WEB)


def test_csr_with_wrong_key_type_is_refused():
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(CSRError, match="must be ECDSA P-256, not RSAPublicKey"):
        validate_csr(_csr(rsa_key, [x509.UniformResourceIdentifier(WEB)]), WEB)
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(CSRError, match="on secp384r1"):
        validate_csr(_csr(p384, [x509.UniformResourceIdentifier(WEB)]), WEB)


def test_csr_with_bad_signature_is_refused():
    pem = make_csr(new_key(), WEB)
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    bad = bytearray(der)
    bad[-5] ^= 0xFF  # inside the signature
    import base64

    bad_pem = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(bad))
        + b"-----END CERTIFICATE REQUEST-----\n"
    )
    with pytest.raises(CSRError, match="signature does not verify"):
        validate_csr(bad_pem, WEB)


def test_garbage_and_missing_san_are_refused():
    with pytest.raises(CSRError, match="not a PEM certificate request"):
        validate_csr(b"hello", WEB)
    with pytest.raises(CSRError, match="has no subjectAltName"):
        validate_csr(_csr(new_key(), []), WEB)


def test_state_persists_with_private_key_0600(tmp_path):
    a = CA.load_or_create(str(tmp_path), TD)
    keyfile = tmp_path / "ca" / "signing-key.pem"
    assert stat.S_IMODE(os.stat(keyfile).st_mode) == 0o600
    b = CA.load_or_create(str(tmp_path), TD)
    assert b.roots == a.roots and camod.fingerprint(b.cert) == camod.fingerprint(a.cert)
    with pytest.raises(DabbaError, match="is for trust domain 'cluster.local', not 'other.td'"):
        CA.load_or_create(str(tmp_path), "other.td")


def _plugin(tmp_path):
    """An offline root and an intermediate, in Istio's cacerts layout."""
    now = datetime.datetime.now(datetime.UTC)
    rk, ik = new_key(), new_key()
    rn = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corp root")])
    inn = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mesh intermediate")])
    bc = x509.BasicConstraints(ca=True, path_length=None)
    root = (
        x509.CertificateBuilder()
        .subject_name(rn)
        .issuer_name(rn)
        .public_key(rk.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(bc, critical=True)
        .sign(rk, hashes.SHA256())
    )
    inter = (
        x509.CertificateBuilder()
        .subject_name(inn)
        .issuer_name(rn)
        .public_key(ik.public_key())
        .serial_number(2)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=10))
        .add_extension(bc, critical=True)
        .sign(rk, hashes.SHA256())
    )
    d = tmp_path / "cacerts"
    d.mkdir()
    (d / "ca-cert.pem").write_bytes(camod.cert_pem(inter))
    (d / "ca-key.pem").write_bytes(camod.key_pem(ik))
    (d / "cert-chain.pem").write_bytes(camod.cert_pem(inter) + camod.cert_pem(root))
    (d / "root-cert.pem").write_bytes(camod.cert_pem(root))
    return d, root, inter


def test_plugin_intermediate_signs_and_chain_reaches_root(tmp_path):
    d, root, inter = _plugin(tmp_path)
    c = CA.load_or_create(str(tmp_path / "state"), TD, plugin_dir=str(d))
    issued = c.issue(make_csr(new_key(), WEB), WEB)
    chain = x509.load_pem_x509_certificates(issued.chain_pem)
    assert chain[1] == inter and len(chain) == 2
    camod.verify_svid(chain, c.roots)
    assert c.roots == [root]
    with pytest.raises(DabbaError, match="rotated by replacing its cacerts"):
        c.rotate()


def test_plugin_with_mismatched_key_is_refused(tmp_path):
    d, _, _ = _plugin(tmp_path)
    (d / "ca-key.pem").write_bytes(camod.key_pem(new_key()))
    with pytest.raises(DabbaError, match="ca-key.pem does not match ca-cert.pem"):
        CA.load_or_create(str(tmp_path / "state"), TD, plugin_dir=str(d))


def test_root_rotation_trusts_first_signs_later_then_retires(tmp_path):
    c = CA.load_or_create(str(tmp_path), TD)
    old_root = c.roots[0]
    before = c.issue(make_csr(new_key(), WEB), WEB).cert
    new_root = c.rotate(overlap_s=60)
    assert c.roots == [old_root, new_root]
    # phase 1: trusted, not signing yet
    c.issue(make_csr(new_key(), WEB), WEB).cert.verify_directly_issued_by(old_root)
    with pytest.raises(DabbaError, match="not active yet"):
        c.retire()
    with pytest.raises(DabbaError, match="already in progress"):
        c.rotate()
    reloaded = CA.load_or_create(str(tmp_path), TD)  # the pending rotation is persisted
    assert reloaded.next_cert == new_root and reloaded.roots == [old_root, new_root]
    assert c.maybe_activate() is False
    # phase 2: after the overlap the new root signs
    import time

    assert c.maybe_activate(now=time.time() + 61) is True
    after = c.issue(make_csr(new_key(), WEB), WEB).cert
    after.verify_directly_issued_by(new_root)
    camod.verify_svid([before], c.roots)  # old certificates still verify during the overlap
    camod.verify_svid([after], c.roots)
    assert CA.load_or_create(str(tmp_path), TD).signing_root() == new_root
    assert c.retire() == [camod.fingerprint(old_root)]
    camod.verify_svid([after], c.roots)
    with pytest.raises(DabbaError, match="not signed by any root"):
        camod.verify_svid([before], c.roots)


def test_renewal_counts_half_life_from_receipt_not_from_backdated_not_before(ca):
    from agent.node.identity import info_of

    c = CA.load_or_create(
        str(ca.dir.rsplit("/ca", 1)[0] + "/short"), TD, workload_ttl=datetime.timedelta(seconds=60)
    )
    issued = c.issue(make_csr(new_key(), WEB), WEB)
    now = datetime.datetime.now(datetime.UTC)
    info = info_of(issued.chain_pem, now, jitter=0.0)
    assert (
        abs((info.renew_at - now).total_seconds() - 30) < 2
    )  # not 0: not_before is backdated 60 s
