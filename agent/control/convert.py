"""Policies between the model and the wire (protobuf), without gRPC: the tunnel imports this.

Reading takes a control_pb2 message or its agent/control/wire.py twin (the tunnel's, without
the protobuf runtime); only writing (the control plane's) imports protobuf."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import model as m

if TYPE_CHECKING:
    from .proto import control_pb2 as pb


def policy_to_pb(p: m.AuthorizationPolicy) -> pb.AuthorizationPolicy:
    from .proto import control_pb2 as pb

    return pb.AuthorizationPolicy(
        name=p.name,
        namespace=p.namespace,
        action=p.action,
        has_selector=p.selector is not None,
        selector=p.selector or {},
        origin=p.origin,
        rules=[
            pb.Rule(
                sources=[
                    pb.Source(
                        principals=s.principals,
                        not_principals=s.not_principals,
                        namespaces=s.namespaces,
                        not_namespaces=s.not_namespaces,
                        ip_blocks=s.ip_blocks,
                        not_ip_blocks=s.not_ip_blocks,
                    )
                    for s in r.sources
                ],
                operations=[
                    pb.Operation(ports=o.ports, not_ports=o.not_ports) for o in r.operations
                ],
                conditions=[
                    pb.Condition(key=c.key, values=c.values, not_values=c.not_values)
                    for c in r.conditions
                ],
                l7_fields=r.l7_fields,
            )
            for r in p.rules
        ],
    )


def root_of(snap: pb.Snapshot) -> str:
    """The mesh's root namespace a snapshot names (one from before it named any: the old one)."""
    return snap.root_namespace or m.LEGACY_ROOT_NAMESPACE


def policy_from_pb(p: pb.AuthorizationPolicy, root: str) -> m.AuthorizationPolicy:
    return m.AuthorizationPolicy(
        p.name,
        p.namespace,
        p.action,
        dict(p.selector) if p.has_selector else None,
        tuple(
            m.Rule(
                tuple(
                    m.Source(
                        tuple(s.principals),
                        tuple(s.not_principals),
                        tuple(s.namespaces),
                        tuple(s.not_namespaces),
                        tuple(s.ip_blocks),
                        tuple(s.not_ip_blocks),
                    )
                    for s in r.sources
                ),
                tuple(m.Operation(tuple(o.ports), tuple(o.not_ports)) for o in r.operations),
                tuple(
                    m.Condition(c.key, tuple(c.values), tuple(c.not_values)) for c in r.conditions
                ),
                tuple(r.l7_fields),
            )
            for r in p.rules
        ),
        p.origin,
        root,
    )
