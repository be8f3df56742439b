"""Read X.509 certificates without an X.509 library: what the agent and the tunnel show and
schedule by (serial, names, validity, SPIFFE IDs, fingerprints).

The node's long-running processes only ever read certificates: TLS itself is the ssl module's,
keys and CSRs are made in a short-lived child (`agent/node/keygen.py`), and signatures are
checked by the control plane and by TLS. Importing cryptography for the reading alone cost
the agent 11 MiB of its 45 (its Rust library and Python modules), in every node's agent for
as long as it runs. This is a DER reader for the fields above, nothing else: it verifies no
signature and trusts nothing it reads. Malformed input is a ValueError, never anything else.
"""

from __future__ import annotations

import binascii
import datetime
import hashlib
from dataclasses import dataclass

_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"

# DER tags (X.690) of what a certificate holds
_INTEGER, _OCTET_STRING, _OID, _SEQUENCE, _SET = 0x02, 0x04, 0x06, 0x30, 0x31
_UTC_TIME, _GENERALIZED_TIME = 0x17, 0x18
_CTX_VERSION, _CTX_EXTENSIONS, _GN_URI = 0xA0, 0xA3, 0x86
_SAN = "2.5.29.17"

# attribute names as RFC 4514 (and cryptography's rfc4514_string) writes them; others dotted
_ATTR_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.6": "C",
    "2.5.4.9": "STREET",
    "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
}
# the string types a name's value may have, and how each is decoded
_STRINGS = {
    0x0C: "utf-8",  # UTF8String
    0x13: "ascii",  # PrintableString
    0x16: "ascii",  # IA5String
    0x12: "ascii",  # NumericString
    0x14: "latin-1",  # TeletexString (T.61; what every CA writes in it is Latin-1)
    0x1A: "ascii",  # VisibleString
    0x1E: "utf-16-be",  # BMPString
    0x1C: "utf-32-be",  # UniversalString
}


@dataclass(frozen=True)
class Certificate:
    """The fields of one certificate the node shows or schedules by."""

    der: bytes
    serial: int
    issuer: str  # RFC 4514, as cryptography's rfc4514_string() writes it
    subject: str
    not_before: datetime.datetime  # UTC
    not_after: datetime.datetime
    uris: tuple[str, ...]  # the subjectAltName's URIs, in order

    @property
    def spiffe_ids(self) -> list[str]:
        return [u for u in self.uris if u.startswith("spiffe://")]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.der).hexdigest()

    @property
    def fingerprint(self) -> str:
        """The short form the control plane's CLI and config dumps show (ca.fingerprint)."""
        return self.sha256[:16]


def pem_blocks(pem: bytes) -> list[bytes]:
    """The DER of every CERTIFICATE block of a PEM text, in order."""
    out, pos = [], 0
    while (start := pem.find(_PEM_BEGIN, pos)) >= 0:
        end = pem.find(_PEM_END, start)
        if end < 0:
            raise ValueError("a PEM certificate block has no END line")
        body = pem[start + len(_PEM_BEGIN) : end]
        try:
            out.append(binascii.a2b_base64(b"".join(body.split()), strict_mode=True))
        except binascii.Error as e:
            raise ValueError(f"a PEM certificate block is not base64: {e}") from None
        pos = end + len(_PEM_END)
    return out


def load_pem(pem: bytes) -> list[Certificate]:
    """Every certificate of a PEM text (a chain or a bundle); ValueError if none or one is bad."""
    blocks = pem_blocks(pem)
    if not blocks:
        raise ValueError("no PEM certificate found")
    return [load_der(d) for d in blocks]


def load_pem_first(pem: bytes) -> Certificate:
    """The first certificate of a PEM text: a chain's leaf."""
    return load_pem(pem)[0]


def load_der(der: bytes) -> Certificate:
    """One certificate from its DER; ValueError names what is wrong."""
    tag, cert, end = _tlv(der, 0)
    if tag != _SEQUENCE or end != len(der):
        raise ValueError("not a DER certificate (one SEQUENCE)")
    tag, tbs, _ = _tlv(cert, 0)
    if tag != _SEQUENCE:
        raise ValueError("certificate: tbsCertificate is not a SEQUENCE")
    fields = _items(tbs)
    i = 1 if fields and fields[0][0] == _CTX_VERSION else 0
    if len(fields) < i + 6:
        raise ValueError("certificate: tbsCertificate has too few fields")
    tag, serial_der = fields[i]
    if tag != _INTEGER or not serial_der:
        raise ValueError("certificate: serialNumber is not an INTEGER")
    issuer, validity, subject = fields[i + 2], fields[i + 3], fields[i + 4]
    if validity[0] != _SEQUENCE:
        raise ValueError("certificate: validity is not a SEQUENCE")
    times = _items(validity[1])
    if len(times) != 2:
        raise ValueError("certificate: validity does not hold two times")
    uris: tuple[str, ...] = ()
    for tag, value in fields[i + 6 :]:
        if tag == _CTX_EXTENSIONS:
            uris = _san_uris(value)
    return Certificate(
        der=bytes(der),
        serial=int.from_bytes(serial_der, "big", signed=True),
        issuer=_name(issuer),
        subject=_name(subject),
        not_before=_time(*times[0]),
        not_after=_time(*times[1]),
        uris=uris,
    )


def _tlv(buf: bytes, pos: int) -> tuple[int, bytes, int]:
    """(tag, value, end) of the DER element at pos; only definite lengths (DER has no other)."""
    if pos + 2 > len(buf):
        raise ValueError("DER truncated: no room for a tag and a length")
    tag, n = buf[pos], buf[pos + 1]
    if tag & 0x1F == 0x1F:
        raise ValueError("DER: multi-byte tags do not occur in a certificate")
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 4 or pos + k > len(buf):
            raise ValueError("DER: bad length")
        n = int.from_bytes(buf[pos : pos + k], "big")
        pos += k
    if pos + n > len(buf):
        raise ValueError("DER truncated: an element runs past its container")
    return tag, buf[pos : pos + n], pos + n


def _items(buf: bytes) -> list[tuple[int, bytes]]:
    """The elements of a constructed value, as (tag, value)."""
    out, pos = [], 0
    while pos < len(buf):
        tag, value, pos = _tlv(buf, pos)
        out.append((tag, value))
    return out


def _oid(value: bytes) -> str:
    if not value or value[-1] & 0x80:
        raise ValueError("DER: bad OBJECT IDENTIFIER")
    arcs, n = [], 0
    for b in value:
        n = (n << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(n)
            n = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))


def _name(field: tuple[int, bytes]) -> str:
    """A Name in RFC 4514 form: last RDN first, an RDN's attributes joined by '+'."""
    tag, value = field
    if tag != _SEQUENCE:
        raise ValueError("certificate: a Name is not a SEQUENCE")
    rdns = []
    for rtag, rdn in _items(value):
        if rtag != _SET:
            raise ValueError("certificate: a name's RDN is not a SET")
        attrs = []
        for atag, atv in _items(rdn):
            parts = _items(atv) if atag == _SEQUENCE else []
            if len(parts) != 2 or parts[0][0] != _OID:
                raise ValueError("certificate: a name's attribute is not (type, value)")
            oid = _oid(parts[0][1])
            attrs.append(f"{_ATTR_NAMES.get(oid, oid)}={_value(*parts[1])}")
        rdns.append("+".join(attrs))
    return ",".join(reversed(rdns))


def _value(tag: int, value: bytes) -> str:
    """An attribute's value as RFC 4514 writes it: a string escaped, another type as '#' and
    its DER in hex (section 2.4)."""
    codec = _STRINGS.get(tag)
    if codec is None:
        return "#" + (bytes([tag]) + _der_length(len(value)) + value).hex()
    try:
        return _escape(value.decode(codec))
    except UnicodeDecodeError:
        raise ValueError("certificate: a name's value is not in its declared encoding") from None


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def _escape(v: str) -> str:
    """RFC 4514 section 2.4, escaped as cryptography's rfc4514_string() does."""
    if not v:
        return v
    for c in ("\\", '"', "+", ",", ";", "<", ">"):
        v = v.replace(c, "\\" + c)
    v = v.replace("\0", "\\00")
    if v[0] in ("#", " "):
        v = "\\" + v
    if v[-1] == " ":
        v = v[:-1] + "\\ "
    return v


def _time(tag: int, value: bytes) -> datetime.datetime:
    try:
        s = value.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("certificate: a time is not ASCII") from None
    if tag == _UTC_TIME and len(s) == 13 and s.endswith("Z") and s[:12].isdigit():
        year = int(s[:2])
        s = ("19" if year >= 50 else "20") + s  # RFC 5280 4.1.2.5.1
    elif not (tag == _GENERALIZED_TIME and len(s) == 15 and s.endswith("Z") and s[:14].isdigit()):
        raise ValueError(f"certificate: a time is not RFC 5280's UTCTime or GeneralizedTime: {s!r}")
    try:
        return datetime.datetime.strptime(s, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        raise ValueError(f"certificate: {s!r} is not a date") from None


def _san_uris(exts: bytes) -> tuple[str, ...]:
    tag, seq, _ = _tlv(exts, 0)
    if tag != _SEQUENCE:
        raise ValueError("certificate: extensions are not a SEQUENCE")
    for etag, ext in _items(seq):
        parts = _items(ext) if etag == _SEQUENCE else []
        if not parts or parts[0][0] != _OID:
            raise ValueError("certificate: an extension is not (id, critical, value)")
        if _oid(parts[0][1]) != _SAN:
            continue
        value = parts[-1]
        if value[0] != _OCTET_STRING:
            raise ValueError("certificate: subjectAltName's value is not an OCTET STRING")
        gtag, names, end = _tlv(value[1], 0)
        if gtag != _SEQUENCE or end != len(value[1]):
            raise ValueError("certificate: subjectAltName is not a SEQUENCE of names")
        out = []
        for ntag, v in _items(names):
            if ntag == _GN_URI:
                try:
                    out.append(v.decode("ascii"))
                except UnicodeDecodeError:
                    raise ValueError("certificate: a URI name is not IA5 (ASCII)") from None
        return tuple(out)
    return ()
