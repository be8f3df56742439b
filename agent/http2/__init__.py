"""HTTP/2 (RFC 9113) as the mesh speaks it: a lean, conformant peer (wire.py) and its header
blocks (headers.py). HBONE's tunnels (agent/ztunnel/hbone/) relay TCP over its CONNECT
streams; a waypoint's supervisor (agent/waypoint/localrpc.py) serves its Envoy gRPC with it.
It imports nothing of either, so each takes only this."""
