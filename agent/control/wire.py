"""The control plane's messages as the node reads and writes them: protobuf's wire format
without the protobuf runtime.

The node's processes use a dozen small messages: the tunnel reads the Snapshot the agent
writes to its state folder; the agent sends the node's requests and reads the answers and
the snapshots (agent/node/rpc.py). The protobuf runtime they imported for that was 3 MiB of
each (its Python modules and the upb extension), a tenth of a process. This decodes the
messages of control.proto into plain objects with the same attribute names and the same
proto3 defaults (absent scalars are "", 0, False, b""; absent repeated fields empty), maps as
dicts; unknown fields are skipped, as protobuf does. It encodes them as protobuf does, and
to_dict() is json_format.MessageToDict(preserving_proto_field_name=True). FIELDS below mirrors
control.proto; tests/unit/test_wire.py holds it equal to control_pb2's descriptors and
compares every message both ways with protobuf's own. Malformed input is a ValueError. The
control plane itself keeps protobuf and grpcio.
"""

from __future__ import annotations

import base64

# field kinds (proto3 scalar types the schema uses, a nested message, a map)
STRING, BYTES, UINT32, UINT64, INT64, BOOL, MESSAGE, MAP = (
    "string",
    "bytes",
    "uint32",
    "uint64",
    "int64",
    "bool",
    "message",
    "map",
)
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_DEFAULTS = {STRING: "", BYTES: b"", UINT32: 0, UINT64: 0, INT64: 0, BOOL: False}


class Message:
    """A decoded message: one attribute per field of its FIELDS."""

    __slots__ = ()
    # number -> (name, kind, repeated, message class for MESSAGE / (key kind, value kind) for MAP)
    FIELDS: dict[int, tuple[str, str, bool, object]] = {}

    def __init__(self, **values):
        for name, kind, repeated, _ in self.FIELDS.values():
            if kind == MAP:
                default = {}
            elif repeated:
                default = []
            else:
                default = _DEFAULTS[kind]
            setattr(self, name, values.pop(name, default))
        if values:
            raise TypeError(f"{type(self).__name__} has no field {next(iter(values))!r}")

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and all(
            getattr(self, s) == getattr(other, s) for s in self.__slots__
        )

    def __hash__(self) -> int:  # mutable, like protobuf's messages
        raise TypeError(f"unhashable type: {type(self).__name__}")

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{s}={getattr(self, s)!r}"
            for s in self.__slots__
            if getattr(self, s) not in ("", 0, [], {}, b"")
        )
        return f"{type(self).__name__}({shown})"

    @classmethod
    def FromString(cls, data: bytes):  # noqa: N802 (protobuf's name, so callers read alike)
        """Decode one message; ValueError names what is malformed and where."""
        return _decode(cls, memoryview(data), 0, len(data))

    def SerializeToString(self) -> bytes:  # noqa: N802
        """Encode as protobuf does: fields in number order, defaults left out, numbers packed."""
        out = bytearray()
        for number, (name, kind, repeated, sub) in self.FIELDS.items():
            v = getattr(self, name)
            if kind == MESSAGE:
                for m in v:
                    _put_len(out, number, m.SerializeToString())
            elif kind == MAP:
                for k, val in v.items():
                    entry = bytearray()
                    _put(entry, 1, sub[0], k)
                    _put(entry, 2, sub[1], val)
                    _put_len(out, number, entry)
            elif repeated and kind != STRING:
                if v:
                    packed = bytearray()
                    for x in v:
                        _put_varint(packed, x & _U64)
                    _put_len(out, number, packed)
            elif repeated:
                for x in v:
                    _put_len(out, number, x.encode())
            elif v != _DEFAULTS[kind]:
                _put(out, number, kind, v)
        return bytes(out)

    def to_dict(self) -> dict:
        """json_format.MessageToDict(self, preserving_proto_field_name=True): what `dabba`
        shows (defaults left out, 64-bit numbers as strings, bytes in base64, map keys as
        strings)."""
        out = {}
        for name, kind, repeated, sub in self.FIELDS.values():
            v = getattr(self, name)
            if kind == MESSAGE:
                if v:
                    out[name] = [m.to_dict() for m in v]
            elif kind == MAP:
                if v:
                    out[name] = {_json_key(k): _json(sub[1], x) for k, x in v.items()}
            elif repeated:
                if v:
                    out[name] = [_json(kind, x) for x in v]
            elif v != _DEFAULTS[kind]:
                out[name] = _json(kind, v)
        return out


_U64 = (1 << 64) - 1


def _json(kind: str, v):
    if kind in (UINT64, INT64):
        return str(v)
    if kind == BYTES:
        return base64.b64encode(v).decode()
    return v


def _json_key(k) -> str:
    return ("true" if k else "false") if isinstance(k, bool) else str(k)


def _put_varint(out: bytearray, n: int) -> None:
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)


def _put_len(out: bytearray, number: int, body) -> None:
    _put_varint(out, number << 3 | _LEN)
    _put_varint(out, len(body))
    out += body


def _put(out: bytearray, number: int, kind: str, v) -> None:
    if kind == STRING:
        _put_len(out, number, v.encode())
    elif kind == BYTES:
        _put_len(out, number, v)
    else:  # a varint: bool, and negative int64 as its 64-bit two's complement
        _put_varint(out, number << 3 | _VARINT)
        _put_varint(out, int(v) & _U64)


def _message(name: str, fields: dict[int, tuple]) -> type[Message]:
    table = {n: (f[0], f[1], len(f) > 2 and f[2] == "repeated", f[3] if len(f) > 3 else None)
             for n, f in fields.items()}  # fmt: skip
    return type(
        name, (Message,), {"__slots__": tuple(f[0] for f in table.values()), "FIELDS": table}
    )


R = "repeated"
Workload = _message("Workload", {
    1: ("name", STRING), 2: ("namespace", STRING), 3: ("service_account", STRING),
    4: ("node", STRING), 5: ("ip", STRING), 6: ("labels", MAP, None, (STRING, STRING)),
    7: ("spiffe_id", STRING), 8: ("cgroup", STRING), 9: ("mtls_mode", STRING),
    10: ("port_mtls", MAP, None, (UINT32, STRING)), 11: ("netns", STRING),
    12: ("pod_uid", STRING), 13: ("ip6", STRING), 14: ("waypoint", STRING),
})  # fmt: skip
ServicePort = _message("ServicePort", {
    1: ("port", UINT32), 2: ("target_port", UINT32), 3: ("name", STRING),
})  # fmt: skip
Service = _message("Service", {
    1: ("name", STRING), 2: ("namespace", STRING), 3: ("vip", STRING),
    4: ("ports", MESSAGE, R, ServicePort), 5: ("lb_policy", STRING), 6: ("endpoints", STRING, R),
    7: ("waypoint", STRING), 8: ("waypoint_pods", STRING, R), 9: ("waypoint_refusal", STRING),
})  # fmt: skip
Node = _message("Node", {1: ("name", STRING), 2: ("address", STRING)})
Source = _message("Source", {
    1: ("principals", STRING, R), 2: ("not_principals", STRING, R),
    3: ("namespaces", STRING, R), 4: ("not_namespaces", STRING, R),
    5: ("ip_blocks", STRING, R), 6: ("not_ip_blocks", STRING, R),
})  # fmt: skip
Operation = _message("Operation", {1: ("ports", UINT32, R), 2: ("not_ports", UINT32, R)})
Condition = _message("Condition", {
    1: ("key", STRING), 2: ("values", STRING, R), 3: ("not_values", STRING, R),
})  # fmt: skip
Rule = _message("Rule", {
    1: ("sources", MESSAGE, R, Source), 2: ("operations", MESSAGE, R, Operation),
    3: ("conditions", MESSAGE, R, Condition), 4: ("l7_fields", STRING, R),
})  # fmt: skip
AuthorizationPolicy = _message("AuthorizationPolicy", {
    1: ("name", STRING), 2: ("namespace", STRING), 3: ("action", STRING),
    4: ("has_selector", BOOL), 5: ("selector", MAP, None, (STRING, STRING)),
    6: ("rules", MESSAGE, R, Rule), 7: ("origin", STRING),
})  # fmt: skip
JoinRequest = _message("JoinRequest", {
    1: ("node", STRING), 2: ("token", STRING), 3: ("csr_pem", BYTES), 4: ("address", STRING),
})  # fmt: skip
NodeCertificate = _message("NodeCertificate", {
    1: ("cert_chain_pem", BYTES), 2: ("trust_bundle_pem", BYTES), 3: ("trust_domain", STRING),
    4: ("not_after_unix", INT64),
})  # fmt: skip
RenewNodeRequest = _message("RenewNodeRequest", {1: ("csr_pem", BYTES)})
SignWorkloadRequest = _message("SignWorkloadRequest", {
    1: ("namespace", STRING), 2: ("name", STRING), 3: ("csr_pem", BYTES),
})  # fmt: skip
WorkloadCertificate = _message("WorkloadCertificate", {
    1: ("spiffe_id", STRING), 2: ("cert_chain_pem", BYTES), 3: ("trust_bundle_pem", BYTES),
    4: ("not_after_unix", INT64), 5: ("serial", STRING),
})  # fmt: skip
WatchRequest = _message("WatchRequest", {1: ("have_version", UINT64)})
Snapshot = _message("Snapshot", {
    1: ("version", UINT64), 2: ("trust_domain", STRING), 3: ("workloads", MESSAGE, R, Workload),
    4: ("services", MESSAGE, R, Service), 5: ("nodes", MESSAGE, R, Node),
    6: ("policies", MESSAGE, R, AuthorizationPolicy), 7: ("trust_bundle_pem", BYTES),
    8: ("signing_root", STRING), 9: ("root_namespace", STRING),
    10: ("revoked_serials", STRING, R),
})  # fmt: skip
del R


def _name(at: tuple) -> str:
    """Where, in an error: Message.field (or the unknown field's number)."""
    return f"{at[0]}.{at[1]}"


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= end:
            raise ValueError(f"truncated varint at byte {pos}")
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos
        shift += 7
        if shift >= 70:
            raise ValueError(f"varint longer than 10 bytes at byte {pos}")


def _scalar(kind: str, wt: int, buf: memoryview, pos: int, end: int, at: tuple):
    """One value of a scalar kind; (value, next position)."""
    if kind in (STRING, BYTES):
        if wt != _LEN:
            return None, pos
        n, pos = _varint(buf, pos, end)
        if pos + n > end:
            raise ValueError(f"{_name(at)}: {n} bytes announced, {end - pos} left")
        raw = bytes(buf[pos : pos + n])
        if kind == STRING:
            try:
                return raw.decode(), pos + n
            except UnicodeDecodeError:
                raise ValueError(f"{_name(at)}: not UTF-8") from None
        return raw, pos + n
    if wt != _VARINT:
        return None, pos
    n, pos = _varint(buf, pos, end)
    if kind == UINT32:
        return n & 0xFFFFFFFF, pos
    if kind == BOOL:
        return n != 0, pos
    n &= _U64
    if kind == INT64 and n >> 63:
        n -= 1 << 64
    return n, pos


def _skip(wt: int, buf: memoryview, pos: int, end: int, at: tuple) -> int:
    if wt == _VARINT:
        return _varint(buf, pos, end)[1]
    if wt == _I64:
        pos += 8
    elif wt == _I32:
        pos += 4
    elif wt == _LEN:
        n, pos = _varint(buf, pos, end)
        pos += n
    else:
        raise ValueError(f"{_name(at)}: wire type {wt} (groups and others are not in this schema)")
    if pos > end:
        raise ValueError(f"{_name(at)}: runs past the end of its message")
    return pos


def _decode(cls: type[Message], buf: memoryview, pos: int, end: int) -> Message:
    msg = cls()
    fields = cls.FIELDS
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wt = key >> 3, key & 7
        if number == 0:
            raise ValueError(f"{cls.__name__}: field number 0 at byte {pos}")
        f = fields.get(number)
        at = (cls.__name__, f[0] if f else number)
        if f is None:
            pos = _skip(wt, buf, pos, end, at)
            continue
        name, kind, repeated, sub = f
        if kind in (MESSAGE, MAP):
            if wt != _LEN:
                pos = _skip(wt, buf, pos, end, at)
                continue
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise ValueError(f"{_name(at)}: {n} bytes announced, {end - pos} left")
            if kind == MESSAGE:
                getattr(msg, name).append(_decode(sub, buf, pos, pos + n))
            else:
                kv = _entry(sub, buf, pos, pos + n, at)
                if kv is not None:
                    getattr(msg, name)[kv[0]] = kv[1]
            pos += n
        elif repeated and kind == UINT32 and wt == _LEN:  # packed
            n, pos = _varint(buf, pos, end)
            stop = pos + n
            if stop > end:
                raise ValueError(f"{_name(at)}: {n} bytes announced, {end - pos} left")
            out = getattr(msg, name)
            while pos < stop:
                v, pos = _varint(buf, pos, stop)
                out.append(v & 0xFFFFFFFF)
        else:
            start = pos
            v, pos = _scalar(kind, wt, buf, pos, end, at)
            if v is None:  # another wire type than the field's: an unknown field to protobuf
                pos = _skip(wt, buf, start, end, at)
            elif repeated:
                getattr(msg, name).append(v)
            else:
                setattr(msg, name, v)
    return msg


def _entry(kinds: tuple[str, str], buf: memoryview, pos: int, end: int, at: tuple):
    """A map entry: (key 1, value 2), each defaulting when absent; None for an entry that holds
    anything else (another field, another wire type), which protobuf keeps out of the map."""
    key, value = _DEFAULTS[kinds[0]], _DEFAULTS[kinds[1]]
    clean = True
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wt = tag >> 3, tag & 7
        start = pos
        v = None
        if number in (1, 2):
            v, pos = _scalar(kinds[number - 1], wt, buf, pos, end, at)
        if v is None:
            pos = _skip(wt, buf, start, end, at)
            clean = False
        elif number == 1:
            key = v
        else:
            value = v
    return (key, value) if clean else None
