"""gRPC's messages on an HTTP/2 stream (gRPC over HTTP/2, "Length-Prefixed-Message"): each a
compressed flag, a 32-bit length and the protobuf bytes, in DATA frames cut anywhere. Both of
the mesh's own gRPC ends use it: a waypoint supervisor's server for its Envoy
(agent/waypoint/localrpc.py) and the agent's client to the control plane (agent/node/rpc.py).
Neither negotiates compression, so a compressed message is refused."""

from __future__ import annotations

import enum
import struct

_PREFIX = struct.Struct(">BL")


class StatusCode(enum.Enum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class MessageError(Exception):
    """A received message that cannot be taken; `kind`: compressed, oversized or unparsable."""

    def __init__(self, kind: str, text: str):
        super().__init__(text)
        self.kind = kind


def status_message(text: str) -> str:
    """A grpc-message value: percent-encoded outside printable ASCII, and '%' itself (gRPC over
    HTTP/2), on one line and at most 512 characters of the text."""
    out = []
    for b in text.replace("\n", " ")[:512].encode():
        out.append(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}")
    return "".join(out)


def frame(msg) -> bytes:
    body = msg.SerializeToString()
    return _PREFIX.pack(0, len(body)) + body


class Messages:
    """A stream's received bytes, as the messages (of class `cls`) they complete."""

    def __init__(self, cls: type, limit: int):
        self.cls, self.limit = cls, limit
        self.buf = bytearray()

    def feed(self, data) -> list:
        self.buf += data
        out = []
        while len(self.buf) >= 5:
            compressed, n = _PREFIX.unpack_from(self.buf)
            if compressed:
                raise MessageError("compressed", "a compressed message (no compression was agreed)")
            if n > self.limit:
                raise MessageError("oversized", f"a message of {n} bytes (at most {self.limit})")
            if len(self.buf) < 5 + n:
                break
            try:
                msg = self.cls.FromString(bytes(self.buf[5 : 5 + n]))
            except Exception as e:  # protobuf's DecodeError, wire.py's ValueError
                raise MessageError("unparsable", f"a message that does not parse: {e}") from None
            del self.buf[: 5 + n]
            out.append(msg)
        return out
