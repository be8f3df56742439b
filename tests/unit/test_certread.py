"""agent/certread.py, the node's X.509 reader, against cryptography's reading of the same
certificates: our CA's, and ones built to have what our CA never writes (multi-valued and
escaped names, other string types, 1950s and post-2049 dates, negative-looking serials,
no SAN, several URIs). Hostile input is a ValueError and nothing else."""

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import certread
from agent.control import ca as camod
from agent.control.ca import CA, make_csr, new_key, spiffe_id

TD = "cluster.local"
WEB = spiffe_id(TD, "shop", "web")
KEY = ec.generate_private_key(ec.SECP256R1())


def _same(ours: certread.Certificate, c: x509.Certificate) -> None:
    assert ours.serial == c.serial_number
    assert ours.issuer == c.issuer.rfc4514_string()
    assert ours.subject == c.subject.rfc4514_string()
    assert ours.not_before == c.not_valid_before_utc
    assert ours.not_after == c.not_valid_after_utc
    assert ours.sha256 == c.fingerprint(hashes.SHA256()).hex()
    assert ours.fingerprint == camod.fingerprint(c)
    assert ours.spiffe_ids == camod.spiffe_ids_of(c)
    assert ours.der == c.public_bytes(serialization.Encoding.DER)


def _build(subject, issuer=None, serial=7, nb=None, na=None, sans=None):
    nb = nb or datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer)
        .public_key(KEY.public_key())
        .serial_number(serial)
        .not_valid_before(nb)
        .not_valid_after(na or nb + datetime.timedelta(days=1))
    )
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return b.sign(KEY, hashes.SHA256())


def test_our_cas_root_leaf_and_chain_read_as_cryptography_reads_them(tmp_path):
    ca = CA.load_or_create(str(tmp_path), TD)
    issued = ca.issue(make_csr(new_key(), WEB), WEB)
    leaf = certread.load_pem_first(issued.chain_pem)
    _same(leaf, issued.cert)
    assert leaf.spiffe_ids == [WEB]
    bundle = ca.bundle_pem()
    roots = certread.load_pem(bundle)
    assert len(roots) == len(ca.roots) >= 1
    for ours, theirs in zip(roots, x509.load_pem_x509_certificates(bundle), strict=True):
        _same(ours, theirs)
        assert ours.spiffe_ids == [f"spiffe://{TD}"]


def test_names_with_every_escape_multivalued_rdns_and_other_string_types():
    subject = x509.Name(
        [
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, 'a,b+c"d\\e;f<g>h'),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, " lead and trail "),
                ]
            ),
            x509.RelativeDistinguishedName(
                [x509.NameAttribute(NameOID.COMMON_NAME, "#not hex, ünïcode\0")]
            ),
            x509.RelativeDistinguishedName(
                [x509.NameAttribute(NameOID.COUNTRY_NAME, "DE")]  # PrintableString
            ),
            x509.RelativeDistinguishedName(
                [x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "local")]  # IA5String
            ),
            x509.RelativeDistinguishedName(  # an OID without a short name: dotted
                [x509.NameAttribute(ObjectIdentifier("1.2.3.4.5"), "x")]
            ),
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(
                        NameOID.EMAIL_ADDRESS, "ops@example.org"
                    )  # IA5String, dotted name
                ]
            ),
        ]
    )
    c = _build(subject, issuer=x509.Name([]))
    ours = certread.load_der(c.public_bytes(serialization.Encoding.DER))
    _same(ours, c)
    assert ours.issuer == ""


@pytest.mark.parametrize(
    "nb,na",
    [
        (datetime.datetime(1950, 1, 1), datetime.datetime(2049, 12, 31, 23, 59, 59)),  # UTCTime
        (datetime.datetime(2026, 1, 1), datetime.datetime(2050, 1, 1)),  # GeneralizedTime
    ],
)
def test_both_time_encodings_and_the_century_rule(nb, na):
    c = _build(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")]),
        nb=nb.replace(tzinfo=datetime.UTC),
        na=na.replace(tzinfo=datetime.UTC),
    )
    _same(certread.load_der(c.public_bytes(serialization.Encoding.DER)), c)


@pytest.mark.parametrize("serial", [1, 0x80, 0xFF, 2**159 - 1])
def test_serials_whose_top_bit_is_set_stay_positive(serial):
    c = _build(x509.Name([]), serial=serial)
    assert certread.load_der(c.public_bytes(serialization.Encoding.DER)).serial == serial


def test_subject_alt_names_uris_in_order_others_ignored_none_without_the_extension():
    sans = [
        x509.DNSName("web.shop"),
        x509.UniformResourceIdentifier("https://not-spiffe.example"),
        x509.UniformResourceIdentifier("spiffe://a/ns/b/sa/c"),
        x509.UniformResourceIdentifier("spiffe://a/ns/b/sa/d"),
    ]
    c = _build(x509.Name([]), sans=sans)
    ours = certread.load_der(c.public_bytes(serialization.Encoding.DER))
    assert ours.uris == (
        "https://not-spiffe.example",
        "spiffe://a/ns/b/sa/c",
        "spiffe://a/ns/b/sa/d",
    )
    _same(ours, c)
    assert (
        certread.load_der(_build(x509.Name([])).public_bytes(serialization.Encoding.DER)).uris == ()
    )


def test_pem_text_around_and_between_blocks_is_ignored_and_no_block_is_an_error():
    a = _build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a")]))
    b = _build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "b")]))
    pem = (
        b"# bundle\n"
        + a.public_bytes(serialization.Encoding.PEM)
        + b"comment\n"
        + b.public_bytes(serialization.Encoding.PEM)
    )
    assert [c.subject for c in certread.load_pem(pem)] == ["CN=a", "CN=b"]
    with pytest.raises(ValueError, match="no PEM certificate"):
        certread.load_pem(b"")
    with pytest.raises(ValueError, match="no END line"):
        certread.load_pem(b"-----BEGIN CERTIFICATE-----\nMIIB\n")
    with pytest.raises(ValueError, match="not base64"):
        certread.load_pem(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n")


def _der():
    return _build(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostile")]),
        sans=[x509.UniformResourceIdentifier("spiffe://a/b")],
    ).public_bytes(serialization.Encoding.DER)


DER = _der()


@pytest.mark.parametrize("cut", [0, 1, 2, 4, 30, len(DER) // 2, len(DER) - 1])
def test_a_truncated_certificate_is_a_value_error(cut):
    with pytest.raises(ValueError):
        certread.load_der(DER[:cut])


def test_trailing_bytes_and_an_oversized_length_are_value_errors():
    with pytest.raises(ValueError, match="one SEQUENCE"):
        certread.load_der(DER + b"\x00")
    with pytest.raises(ValueError, match="bad length"):
        certread.load_der(b"\x30\x85\x01\x00\x00\x00\x00")


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(DER) - 1), st.integers(0, 255))
def test_any_one_byte_changed_reads_or_is_a_value_error(pos, byte):
    bad = bytearray(DER)
    bad[pos] = byte
    try:
        ours = certread.load_der(bytes(bad))
    except ValueError:
        return
    assert isinstance(ours.serial, int) and isinstance(ours.issuer, str)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_a_value_error(data):
    try:
        certread.load_der(data)
    except ValueError:
        pass
