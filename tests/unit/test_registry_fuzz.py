"""Registry documents made hostile by hypothesis: whatever the YAML holds, the registry says
which file and line is wrong (RegistryError) or accepts it as valid; it never raises anything
else, never accepts a name that is not a Kubernetes name, and never takes long.

Each example starts from a valid document of each kind and replaces one part of it (a leaf or
a whole subtree) with arbitrary YAML-shaped data: other types, non-ASCII, huge numbers, nesting.
"""

import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.control import model as m
from agent.control import registry, validate

VALID = [
    {
        "apiVersion": "dabbawala.io/v1",
        "kind": "Workload",
        "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"serviceAccount": "web", "node": "n1", "ip": "10.20.1.11", "cgroup": "/x/y"},
    },
    {
        "apiVersion": "dabbawala.io/v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "vip": "10.96.0.10",
            "ports": [{"port": 80, "targetPort": 8080, "name": "http"}],
            "selector": {"app": "web"},
            "lbPolicy": "round_robin",
        },
    },
    {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "action": "DENY",
            "rules": [
                {
                    "from": [{"source": {"principals": ["a"], "ipBlocks": ["10.0.0.0/8"]}}],
                    "to": [{"operation": {"ports": ["80"]}}],
                    "when": [{"key": "source.ip", "values": ["10.0.0.1"]}],
                }
            ],
        },
    },
    {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {8080: {"mode": "PERMISSIVE"}},
        },
    },
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.sampled_from(["..", "identity", "a/b", "Ünïcode", "", "-", "*", "0", "STRICT", "ALLOW"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=10), st.integers()), inner, max_size=4),
    ),
    max_leaves=12,
)


def _paths(v, at=()):
    yield at
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, (*at, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, (*at, i))


def _replace(doc, path, new):
    if not path:
        return new
    out = copy.deepcopy(doc)
    cur = out
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = new
    return out


@st.composite
def hostile(draw):
    doc = draw(st.sampled_from(VALID))
    path = draw(st.sampled_from(list(_paths(doc))))
    return _replace(doc, path, draw(values))


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(hostile())
def test_a_hostile_document_is_refused_with_file_and_line_or_is_valid(doc):
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        return  # not representable as YAML: nothing a file could hold
    state = m.State()
    try:
        registry.parse_text(text, "f.yaml", state, lambda _w: None)
    except registry.RegistryError as e:
        assert str(e).startswith("f.yaml:"), str(e)
        return
    for table in (state.workloads, state.services, state.authz, state.peerauth):
        for obj in table.values():  # what was accepted is made of Kubernetes names
            assert validate.namespace_error(obj.namespace) is None, obj
            assert validate.name_error(obj.name) is None, obj
    for w in state.workloads.values():
        assert validate.name_error(w.service_account) is None, w
        assert all(validate.label_error(k, v) is None for k, v in w.labels.items()), w
