"""The control plane's snapshot as the tunnel reads it: protobuf's wire format, decoded without
the protobuf runtime.

The tunnel reads one message, the Snapshot the agent writes to its state folder, and never
writes one. The protobuf runtime it imported for that was 3 MiB of its resident memory (its
Python modules and the upb extension), a tenth of the process. This decodes the messages of
control.proto that a Snapshot holds into plain objects with the same attribute names, the
same proto3 defaults (absent scalars are "", 0, False, b""; absent repeated fields empty) and
maps as dicts; unknown fields are skipped, as protobuf does. FIELDS below mirrors
control.proto, and tests/unit/test_wire.py holds it equal to control_pb2's descriptors and
compares every decoded message with protobuf's own decoding. Malformed input is a ValueError.
"""

from __future__ import annotations

# field kinds (proto3 scalar types the schema uses, a nested message, a map)
STRING, BYTES, UINT32, UINT64, BOOL, MESSAGE, MAP = (
    "string",
    "bytes",
    "uint32",
    "uint64",
    "bool",
    "message",
    "map",
)
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_DEFAULTS = {STRING: "", BYTES: b"", UINT32: 0, UINT64: 0, BOOL: False}


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
    return n & 0xFFFFFFFFFFFFFFFF, pos


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
