"""HTTP/2 (RFC 9113) as the mesh speaks it: a lean, conformant peer (wire.py), its header
blocks (headers.py) and gRPC's messages on its streams (grpc.py). HBONE's tunnels
(agent/ztunnel/hbone/) relay TCP over its CONNECT streams; a waypoint's supervisor
(agent/waypoint/localrpc.py) serves its Envoy gRPC with it, and the agent (agent/node/rpc.py)
calls the control plane. It imports nothing of any of them, so each takes only this."""
