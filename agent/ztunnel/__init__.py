"""The per-node tunnel: outbound (15001), inbound HBONE (15008), plaintext inbound (15006),
the HBONE pool, policy, the splice (splice(2) through pipes) and its hand-off on upgrades.
"""
