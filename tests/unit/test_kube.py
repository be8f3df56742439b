"""Kubernetes source: translation of recorded objects.

No API server runs here: the objects are in the API's JSON shape
(tests/data/k8s/objects.json) and are deserialized by the official
client's own models, as the live source receives them; only the list
calls themselves are not exercised.
"""

import json
import os

import pytest
from kubernetes.client import ApiClient

from agent.control.kube import translate
from agent.control.registry import RegistryError

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "k8s", "objects.json")


def _models(raw, kind):
    api = ApiClient()
    return [api._ApiClient__deserialize(o, kind) for o in raw]


@pytest.fixture
def objs():
    with open(DATA) as f:
        raw = json.load(f)
    return (
        _models(raw["pods"], "V1Pod"),
        _models(raw["services"], "V1Service"),
        _models(raw["endpointslices"], "V1EndpointSlice"),
        raw["authorizationpolicies"],
        raw["peerauthentications"],
    )


def test_pods_services_and_istio_policies_translate(objs):
    st = translate(*objs)
    assert sorted(st.workloads) == [
        "front/sleep-1",
        "shop/web-7d4b9c-abcde",
        "shop/web-7d4b9c-fghij",
    ]
    w = st.workloads["shop/web-7d4b9c-abcde"]
    assert (w.service_account, w.node, w.ip, w.labels["version"]) == (
        "web",
        "node-a",
        "10.244.1.17",
        "v1",
    )
    assert st.workloads["front/sleep-1"].service_account == "default"
    # the node finds the pod's cgroup and netns by its UID (agent/node/pods.py)
    assert w.pod_uid == "0f1e2d3c-1111-2222-3333-444455556666" and w.cgroup == ""
    svc = st.services["shop/web"]
    assert svc.vip == "10.96.12.34" and svc.lb_policy == "least_connections"
    assert [(p.port, p.target_port) for p in svc.ports] == [
        (80, 8080),
        (9090, 9090),
    ]  # named port resolved; UDP out
    assert "shop/web-headless" not in st.services
    assert sorted(x.key for x in st.endpoints(svc)) == [
        "shop/web-7d4b9c-abcde",
        "shop/web-7d4b9c-fghij",
    ]
    p = st.authz["shop/web-from-front"]
    assert p.rules[0].sources[0].namespaces == ("front",) and p.rules[0].operations[0].ports == (
        8080,
    )
    assert st.authz["shop/get-only"].rules[0].l7_fields == ("to.operation.methods",)
    assert any(
        "k8s:AuthorizationPolicy/shop/get-only" in x and "to.operation.methods" in x
        for x in st.warnings
    )
    assert st.peer_mode(w) == "STRICT"


def test_bad_istio_object_is_named(objs):
    pods, svcs, slices, authz, pa = objs
    bad = dict(authz[0], spec={"action": "SOMETIMES"})
    with pytest.raises(
        RegistryError, match=r"k8s:AuthorizationPolicy/shop/web-from-front:\d+: action 'SOMETIMES'"
    ):
        translate(pods, svcs, slices, [bad], pa)
