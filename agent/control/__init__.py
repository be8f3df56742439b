"""The control plane (CA, registry, gRPC distribution).

Not built yet: the control-plane issue builds it.
"""
