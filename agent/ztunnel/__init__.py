"""The per-node tunnel (outbound 15001, inbound HBONE 15008, pools, policy, splice hand-off).

Not built yet: the tunnel issue builds it on agent.bpf.capture (original
destination without bcc) and agent.bpf.splice (kernel splice for same-node
and passthrough flows).
"""
