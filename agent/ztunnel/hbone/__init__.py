"""HBONE: TCP flows as HTTP/2 CONNECT streams over mutual TLS 1.3 (ALPN h2), as Istio's ztunnel.

Server (inbound, 15008): presents the certificate of the destination
workload the client names by SNI, requires a client certificate from the
trust bundle, hands each CONNECT (``:authority`` = destination ip:port) with
the client's SPIFFE ID to a callback that decides and connects upstream,
answers 200 and relays.

Client (outbound): presents the source workload's certificate, requires the
destination workload's SPIFFE ID from the server (else the connection is
refused), and multiplexes flows as streams on pooled connections, one per
(source identity, destination identity, destination node): a new flow
costs a stream, not a handshake.

Relaying runs in protocol callbacks, without a coroutine per chunk. HTTP/2
flow control carries TCP backpressure both ways: received DATA is
acknowledged (window opened) only as the TCP side drains, and a TCP side
is paused while its stream's send window is closed. Half-close maps to
END_STREAM; a reset on either side resets the other.
"""

# every name the module had before it was split (tests and callers use them)
from .client import ClientConnection, Pool, dial_tcp
from .codec import (
    CONTROL_HIGH,
    HBONE_HIGH_WATER,
    MAX_FRAME,
    MAX_PENDING_OPENS,
    MAX_QUEUED_CONTROL,
    MAX_STREAMS,
    MAX_UNSENT,
    POOL_MAX_AGE,
    TCP_HIGH_WATER,
    WINDOW,
    H2Connection,
    HboneError,
    Stream,
    TcpSide,
    _authority_ok,
    _forwarded_for,
    _mtime_ns,
    baggage,
    forwarded,
    rst,
)
from .server import ServerConnection

__all__ = [
    "CONTROL_HIGH",
    "HBONE_HIGH_WATER",
    "ClientConnection",
    "H2Connection",
    "HboneError",
    "MAX_FRAME",
    "MAX_PENDING_OPENS",
    "MAX_QUEUED_CONTROL",
    "MAX_STREAMS",
    "MAX_UNSENT",
    "POOL_MAX_AGE",
    "Pool",
    "ServerConnection",
    "Stream",
    "TCP_HIGH_WATER",
    "TcpSide",
    "WINDOW",
    "_authority_ok",
    "_forwarded_for",
    "_mtime_ns",
    "dial_tcp",
    "baggage",
    "forwarded",
    "rst",
]
