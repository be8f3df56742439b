"""The waypoint's secrets for its Envoy, over SDS on the supervisor's unix socket: ``default``
(its certificate and key: the key is made here and never leaves the node) and ``ROOTCA`` (the
trust bundle). A new certificate (renewal, root rotation) is pushed on every open stream."""

from __future__ import annotations

import asyncio
import uuid

from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from .. import log
from ..control.xds.common import BUNDLE, CERT
from ..control.xds.streams import Requests

_log = log.get("waypoint")
PATH = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets"  # its gRPC method
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


class Secrets:
    def __init__(self):
        self.key_pem = self.chain_pem = self.bundle_pem = b""
        self.version = ""
        self.changed = asyncio.Condition()

    async def set(self, key_pem: bytes, chain_pem: bytes, bundle_pem: bytes) -> None:
        async with self.changed:
            self.key_pem, self.chain_pem, self.bundle_pem = key_pem, chain_pem, bundle_pem
            self.version = uuid.uuid4().hex[:12]
            self.changed.notify_all()

    def _secret(self, name: str) -> secret_pb2.Secret | None:
        if name == CERT:
            return secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
                certificate_chain={"inline_bytes": self.chain_pem},
                private_key={"inline_bytes": self.key_pem}))  # fmt: skip
        if name == BUNDLE:
            return secret_pb2.Secret(name=name, validation_context=common_pb2.CertificateValidationContext(
                trusted_ca={"inline_bytes": self.bundle_pem}))  # fmt: skip
        return None

    async def StreamSecrets(self, request_iterator):
        names: list[str] = []
        sent = ""
        async with Requests(request_iterator) as requests:
            while True:
                if names and self.version and sent != self.version:
                    res = []
                    for n in names:
                        s = self._secret(n)
                        if s is None:
                            _log.warning(f"Envoy asked for secret {n!r}, which is not served")
                            continue
                        a = any_pb2.Any()
                        a.Pack(s)
                        res.append(a)
                    sent = self.version
                    yield discovery_pb2.DiscoveryResponse(
                        version_info=sent, resources=res, type_url=SECRET,
                        nonce=uuid.uuid4().hex[:12])  # fmt: skip
                req = await requests.next_or(self._changed(sent))
                if req is None:
                    return
                if req is Requests.CHANGED:
                    continue
                if req.HasField("error_detail") and req.error_detail.code:
                    _log.error(f"Envoy rejected its secrets: {req.error_detail.message}")
                if list(req.resource_names) != names:
                    names = list(req.resource_names)
                    sent = ""  # (re)send for the names now asked

    async def _changed(self, sent: str) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.version and self.version != sent)
