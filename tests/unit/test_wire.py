"""agent/control/wire.py, the node's protobuf messages, against protobuf: its schema is
control_pb2's, field by field; every message protobuf writes (hypothesis builds them, with
unicode, empty and extreme values, maps and packed and unpacked repeated numbers) decodes to
what protobuf's own decoder reads, what it encodes protobuf reads back the same (byte for byte
where protobuf's output is deterministic), and to_dict() is MessageToDict's. Malformed input
is a ValueError; unknown fields are skipped."""

import pytest
from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.json_format import MessageToDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.control import wire
from agent.control.proto import control_pb2 as pb

_KINDS = {
    FD.TYPE_STRING: wire.STRING,
    FD.TYPE_BYTES: wire.BYTES,
    FD.TYPE_UINT32: wire.UINT32,
    FD.TYPE_UINT64: wire.UINT64,
    FD.TYPE_INT64: wire.INT64,
    FD.TYPE_BOOL: wire.BOOL,
}
MESSAGES = [
    "Snapshot",
    "Workload",
    "Service",
    "ServicePort",
    "Node",
    "AuthorizationPolicy",
    "Rule",
    "Source",
    "Operation",
    "Condition",
    "JoinRequest",
    "NodeCertificate",
    "RenewNodeRequest",
    "SignWorkloadRequest",
    "WorkloadCertificate",
    "WatchRequest",
]


@pytest.mark.parametrize("name", MESSAGES)
def test_the_schema_is_control_protos(name):
    desc = getattr(pb, name).DESCRIPTOR
    ours = getattr(wire, name).FIELDS
    assert set(ours) == {f.number for f in desc.fields}
    for f in desc.fields:
        fname, kind, repeated, sub = ours[f.number]
        assert fname == f.name
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            k, v = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            assert (kind, sub) == (wire.MAP, (_KINDS[k.type], _KINDS[v.type]))
        elif f.message_type is not None:
            assert (kind, repeated, sub.__name__) == (wire.MESSAGE, True, f.message_type.name)
        else:
            assert kind == _KINDS[f.type]
            assert repeated == (f.label == FD.LABEL_REPEATED)


def _same(ours, theirs) -> None:
    """Every field of a protobuf message equals the decoded one's."""
    assert type(ours).__name__ == theirs.DESCRIPTOR.name
    for f in theirs.DESCRIPTOR.fields:
        a, b = getattr(ours, f.name), getattr(theirs, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            assert a == dict(b), f.name
        elif f.message_type is not None:
            assert len(a) == len(b), f.name
            for x, y in zip(a, b, strict=True):
                _same(x, y)
        elif f.label == FD.LABEL_REPEATED:
            assert a == list(b), f.name
        else:
            assert a == b and type(a) is type(b), f.name


text = st.text(max_size=12)
names = st.lists(text, max_size=3)
u32 = st.integers(0, 2**32 - 1)
labels = st.dictionaries(text, text, max_size=3)
workloads = st.builds(
    pb.Workload,
    name=text,
    namespace=text,
    service_account=text,
    node=text,
    ip=text,
    labels=labels,
    spiffe_id=text,
    cgroup=text,
    mtls_mode=text,
    port_mtls=st.dictionaries(u32, text, max_size=3),
    netns=text,
    pod_uid=text,
    ip6=text,
    waypoint=text,
)
services = st.builds(
    pb.Service,
    name=text,
    namespace=text,
    vip=text,
    ports=st.lists(st.builds(pb.ServicePort, port=u32, target_port=u32, name=text), max_size=3),
    lb_policy=text,
    endpoints=names,
    waypoint=text,
    waypoint_pods=names,
    waypoint_refusal=text,
)
rules = st.builds(
    pb.Rule,
    sources=st.lists(
        st.builds(
            pb.Source,
            principals=names,
            not_principals=names,
            namespaces=names,
            not_namespaces=names,
            ip_blocks=names,
            not_ip_blocks=names,
        ),
        max_size=2,
    ),
    operations=st.lists(
        st.builds(
            pb.Operation, ports=st.lists(u32, max_size=4), not_ports=st.lists(u32, max_size=4)
        ),
        max_size=2,
    ),
    conditions=st.lists(
        st.builds(pb.Condition, key=text, values=names, not_values=names), max_size=2
    ),
    l7_fields=names,
)
policies = st.builds(
    pb.AuthorizationPolicy,
    name=text,
    namespace=text,
    action=text,
    has_selector=st.booleans(),
    selector=labels,
    rules=st.lists(rules, max_size=2),
    origin=text,
)
snapshots = st.builds(
    pb.Snapshot,
    version=st.integers(0, 2**64 - 1),
    trust_domain=text,
    workloads=st.lists(workloads, max_size=3),
    services=st.lists(services, max_size=2),
    nodes=st.lists(st.builds(pb.Node, name=text, address=text), max_size=2),
    policies=st.lists(policies, max_size=2),
    trust_bundle_pem=st.binary(max_size=40),
    signing_root=text,
    root_namespace=text,
    revoked_serials=names,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots)
def test_every_snapshot_protobuf_writes_decodes_as_protobuf_reads_it_and_back(snap):
    data = snap.SerializeToString()
    ours = wire.Snapshot.FromString(data)
    _same(ours, pb.Snapshot.FromString(data))
    again = ours.SerializeToString()
    assert pb.Snapshot.FromString(again) == snap  # maps: protobuf's own order is not fixed
    assert wire.Snapshot.FromString(again) == ours
    assert ours.to_dict() == MessageToDict(snap, preserving_proto_field_name=True)


small = st.binary(max_size=30)
i64 = st.integers(-(2**63), 2**63 - 1)
requests = st.one_of(
    st.builds(pb.JoinRequest, node=text, token=text, csr_pem=small, address=text),
    st.builds(pb.NodeCertificate, cert_chain_pem=small, trust_bundle_pem=small,
              trust_domain=text, not_after_unix=i64),
    st.builds(pb.RenewNodeRequest, csr_pem=small),
    st.builds(pb.SignWorkloadRequest, namespace=text, name=text, csr_pem=small),
    st.builds(pb.WorkloadCertificate, spiffe_id=text, cert_chain_pem=small,
              trust_bundle_pem=small, not_after_unix=i64, serial=text),
    st.builds(pb.WatchRequest, have_version=st.integers(0, 2**64 - 1)),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(requests)
def test_the_agents_requests_and_answers_encode_byte_for_byte_as_protobufs(msg):
    cls = getattr(wire, msg.DESCRIPTOR.name)
    data = msg.SerializeToString()
    ours = cls.FromString(data)
    _same(ours, msg)
    assert ours.SerializeToString() == data
    assert cls(**{f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}) == ours
    assert ours.to_dict() == MessageToDict(msg, preserving_proto_field_name=True)


def test_defaults_equality_and_unknown_fields():
    assert wire.Snapshot.FromString(b"") == wire.Snapshot()
    w = wire.Workload.FromString(b"")
    assert (w.name, w.labels, w.port_mtls) == ("", {}, {})
    assert wire.Workload(name="a") != wire.Workload(name="b")
    # a field from a newer control plane (number 99, each wire type) is skipped, as protobuf does
    known = pb.Workload(name="web", ip="10.0.0.1").SerializeToString()
    unknown = bytes([0x98, 0x06, 0x96, 0x01])  # field 99 varint (tag 99 << 3 | 0)
    unknown += bytes([0x9A, 0x06, 2, ord("h"), ord("i")])  # length-delimited
    unknown += bytes([0x99, 0x06, *range(8)])  # fixed64
    unknown += bytes([0x9D, 0x06, *range(4)])  # fixed32
    for data in (known + unknown, unknown + known):
        got = wire.Workload.FromString(data)
        assert (got.name, got.ip) == ("web", "10.0.0.1")
        _same(got, pb.Workload.FromString(data))
    # ports unpacked (another writer's choice) read as packed ones
    unpacked = bytes([1 << 3 | 0, 80, 1 << 3 | 0, 0x90, 0x03])
    assert (
        wire.Operation.FromString(unpacked).ports
        == [80, 400]
        == list(pb.Operation.FromString(unpacked).ports)
    )
    with pytest.raises(TypeError, match="no field 'nme'"):
        wire.Workload(nme="typo")


SAMPLE = pb.Snapshot(
    version=7,
    trust_domain="cluster.local",
    workloads=[pb.Workload(name="web", labels={"app": "web"}, port_mtls={8080: "DISABLE"})],
    policies=[
        pb.AuthorizationPolicy(name="p", rules=[pb.Rule(operations=[pb.Operation(ports=[80])])])
    ],
).SerializeToString()


@pytest.mark.parametrize("cut", range(1, len(SAMPLE)))
def test_a_truncated_snapshot_is_a_value_error_that_names_where(cut):
    try:
        pb.Snapshot.FromString(SAMPLE[:cut])
    except Exception:  # noqa: BLE001 (protobuf's DecodeError)
        with pytest.raises(ValueError, match=r"Snapshot|Workload|Policy|Rule|Operation|varint"):
            wire.Snapshot.FromString(SAMPLE[:cut])
        return
    _same(wire.Snapshot.FromString(SAMPLE[:cut]), pb.Snapshot.FromString(SAMPLE[:cut]))


@pytest.mark.parametrize(
    "data,what",
    [
        (b"\x12\x02\xff\xfe", "not UTF-8"),  # trust_domain
        (b"\x08" + b"\xff" * 11, "longer than 10 bytes"),
        (b"\x1a\x05\x0a\x01", "announced"),  # a workload longer than what follows
        (b"\x00\x01", "field number 0"),
        (b"\x5b\x00", "wire type 3"),  # a group: not in this schema
    ],
)
def test_malformed_snapshots_are_value_errors(data, what):
    with pytest.raises(ValueError, match=what):
        wire.Snapshot.FromString(data)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, len(SAMPLE) - 1), st.integers(0, 255))
def test_any_one_byte_changed_decodes_as_protobuf_does_or_is_a_value_error(pos, byte):
    bad = bytearray(SAMPLE)
    bad[pos] = byte
    try:
        ours = wire.Snapshot.FromString(bytes(bad))
    except ValueError:
        return
    try:
        theirs = pb.Snapshot.FromString(bytes(bad))
    except Exception:  # noqa: BLE001 (protobuf refuses what we read: the tunnel's is stricter nowhere it matters)
        return
    _same(ours, theirs)
