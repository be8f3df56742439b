"""A node's channel to the control plane through grpcio, for tests that call the control
plane's services with a second gRPC implementation (ADS, fuzzed messages). The agent itself
calls it with its own client (agent/node/rpc.py)."""

import grpc


def node_channel(addr: str, bundle_pem: bytes, key_pem: bytes, chain_pem: bytes):
    creds = grpc.ssl_channel_credentials(
        root_certificates=bundle_pem, private_key=key_pem, certificate_chain=chain_pem
    )
    return grpc.aio.secure_channel(
        addr, creds, options=[("grpc.max_receive_message_length", 16 << 20)]
    )
