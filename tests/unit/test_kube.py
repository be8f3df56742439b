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

FRONT = "spiffe://cluster.local/ns/front/sa/sleep"

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


def _named(obj, name, spec):
    return dict(obj, metadata=dict(obj["metadata"], name=name), spec=spec)


def test_an_istio_object_we_cannot_honour_is_refused_on_its_own_and_fails_closed(objs):
    """Before: one such object (a tenant's, valid for Istio) made the whole list fail, so no
    later change was published cluster-wide and the control plane could not start."""
    from agent.ztunnel.policy import Request, evaluate

    pods, svcs, slices, authz, pa = objs
    sel = {"selector": {"matchLabels": {"app": "web"}}}
    bad = [
        _named(authz[0], "sometimes", {**sel, "action": "SOMETIMES"}),
        _named(authz[0], "ext-authz", {**sel, "action": "CUSTOM", "provider": {"name": "x"}}),
        _named(  # a newer Istio's field, in an ALLOW policy
            authz[0],
            "by-sa",
            {**sel, "rules": [{"from": [{"source": {"serviceAccounts": ["front/sleep"]}}]}]},
        ),
    ]
    odd = {**sel, "mtls": {"mode": "SOMETIMES"}}
    bad_pa = [dict(pa[0], metadata={"name": "odd-mode", "namespace": "shop"}, spec=odd)]
    st = translate(pods, svcs, slices, authz + bad, pa + bad_pa)
    # the good ones are all there, as without the bad ones
    good = translate(pods, svcs, slices, authz, pa)
    assert all(st.authz[k] == v for k, v in good.authz.items())
    assert sorted(st.workloads) == sorted(good.workloads)
    # each bad one is named with its reason, and stands as a DENY of all it selects
    for name, why in (
        ("sometimes", "action 'SOMETIMES' is not one of"),
        ("ext-authz", "action CUSTOM (external authorization) is not supported"),
        ("by-sa", "source.serviceAccounts is not supported here"),
    ):
        (warning,) = [w for w in st.warnings if f"k8s:AuthorizationPolicy/shop/{name}:" in w]
        assert why in warning and "every connection to what it selects is denied" in warning
        p = st.authz[f"shop/{name}"]
        assert (p.action, p.selector) == ("DENY", {"app": "web"}), p
    web = st.workloads["shop/web-7d4b9c-abcde"]
    d = evaluate(list(st.authz.values()), web, Request("10.244.2.9", web.ip, 8080, FRONT))
    assert not d.allowed and "refused by the control plane" in d.reason, d
    sleep = st.workloads["front/sleep-1"]  # not selected: untouched
    assert evaluate(
        list(st.authz.values()), sleep, Request("10.0.0.1", sleep.ip, 80, FRONT)
    ).allowed
    (warning,) = [w for w in st.warnings if "k8s:PeerAuthentication/shop/odd-mode:" in w]
    assert "mtls.mode 'SOMETIMES'" in warning and "what it selects is STRICT" in warning
    assert st.peerauth["shop/odd-mode"].mode == "STRICT"


def test_a_pod_whose_names_are_not_kubernetes_names_is_left_out(objs):
    """Before: a non-ASCII namespace or service account reached the nodes and made an agent
    crash-loop building its CSR; a namespace '..' named a folder above the node's."""
    pods, svcs, slices, authz, pa = objs
    import copy

    odd = []
    for i, (field, value) in enumerate(
        [("namespace", ".."), ("namespace", "caf\u00e9"), ("service_account_name", "s\u00e4")]
    ):
        p = copy.deepcopy(pods[0])
        p.metadata.name = f"odd-{i}"
        if field == "namespace":
            p.metadata.namespace = value
        else:
            p.spec.service_account_name = value
        odd.append(p)
    st = translate(pods + odd, svcs, slices, authz, pa)
    assert sorted(st.workloads) == sorted(translate(pods, svcs, slices, authz, pa).workloads)
    left = [w for w in st.warnings if "k8s:Pod/" in w]
    assert len(left) == 3 and all("left out" in w for w in left), left
    assert "is not a DNS-1123 label" in left[0] and "serviceAccountName" in left[2]


def test_dual_stack_pods_get_both_addresses_and_ipv6_only_pods_are_left_out(objs):
    """status.podIPs in either order gives the pod its IPv4 and IPv6 address; a pod with no
    IPv4 address is not meshed (said, not silently half-meshed)."""
    pods, svcs, slices, authz, pa = objs
    import copy

    from kubernetes.client import V1PodIP

    v6first, v6only = copy.deepcopy(pods[0]), copy.deepcopy(pods[0])
    v6first.metadata.name, v6only.metadata.name = "dual", "v6only"
    v6first.status.pod_ip = "fd00:20:1::b"
    v6first.status.pod_i_ps = [V1PodIP(ip="fd00:20:1::b"), V1PodIP(ip="10.20.1.99")]
    v6only.status.pod_ip = "fd00:20:1::c"
    v6only.status.pod_i_ps = [V1PodIP(ip="fd00:20:1::c")]
    st = translate([v6first, v6only], svcs, slices, authz, pa)
    w = st.workloads[f"{v6first.metadata.namespace}/dual"]
    assert (w.ip, w.ip6) == ("10.20.1.99", "fd00:20:1::b")
    assert f"{v6only.metadata.namespace}/v6only" not in st.workloads
    left = [x for x in st.warnings if "v6only" in x]
    assert len(left) == 1 and "the pod has no IPv4 address" in left[0], left


@pytest.fixture
def api(tmp_path):
    from agent.lab.kubeapi import KubeAPI

    with open(DATA) as f:
        a = KubeAPI(json.load(f))
    yield a, a.kubeconfig(str(tmp_path / "kubeconfig"))
    a.close()


def test_a_failed_istio_list_keeps_the_last_good_state_only_a_missing_crd_is_none(api):
    """Through the real client against an API-server stand-in (none can run here). Before: any
    error listing an Istio kind read as "no such objects": one hiccup or throttled list (429)
    published a state with no AuthorizationPolicy and no PeerAuthentication, mesh-wide."""
    from agent.control.kube import KubeSource

    a, kubeconfig = api
    src = KubeSource(kubeconfig=kubeconfig, interval=3600)
    first = dict(src.state.authz), dict(src.state.peerauth)
    assert first[0] and first[1] and src.state.version == 1
    for status in (429, 500, 403):
        a.fail = {"/apis/security.istio.io/v1/authorizationpolicies": status}
        assert src.poll() is False
        assert (src.state.authz, src.state.peerauth) == first and src.state.version == 1
        assert f"authorizationpolicies failed: {status}" in src.last_error, src.last_error
        assert src.failures >= 1
    # Istio uninstalled (both versions 404): no policies is then the truth
    a.fail = {
        f"/apis/security.istio.io/{v}/{k}": 404
        for v in ("v1", "v1beta1")
        for k in ("authorizationpolicies", "peerauthentications")
    }
    assert src.poll() is True
    assert (src.state.authz, src.state.peerauth, src.state.version) == ({}, {}, 2)
    assert src.last_error is None
    # and the API server going away keeps what was last good
    a.close()
    assert src.poll() is False and src.state.version == 2 and src.last_error


AGENT_SA = "system:serviceaccount:dabbawala-system:dabba-agent"


def _jwt(n: int) -> str:
    return f"eyJhbGciOiJSUzI1NiJ9.eyJuIjo{n}fQ.c2lnbmF0dXJl"  # the shape only: the API checks


def test_a_node_joins_with_its_agent_pods_token_and_only_as_its_own_node(api, tmp_path):
    """Before: every node's init container mounted every node's join token (one Secret), so a
    compromised node could join as any other. Now a node may join with its agent pod's
    ServiceAccount token, which the API server (here its stand-in, through the real client)
    binds to a pod on one node: joining as any other node, with another account's token, for
    another audience, or with a token whose pod is gone, is refused."""
    import asyncio

    from agent.control.server import ControlConfig, ControlServer
    from agent.errors import DabbaError
    from agent.node.control_client import join

    a, kubeconfig = api
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "dabba-agent-x1", "namespace": "dabbawala-system", "uid": "u-1"},
           "spec": {"nodeName": "node-b", "containers": [{"name": "agent", "image": "x"}]}}  # fmt: skip
    objs = a.objects
    objs["pods"] = objs["pods"] + [pod]
    objs["tokenreviews"] = {
        _jwt(1): {"username": AGENT_SA, "audiences": ["dabbawala-join"],
                  "extra": {"authentication.kubernetes.io/node-name": ["node-a"]}},
        _jwt(2): {"username": "system:serviceaccount:shop:web", "audiences": ["dabbawala-join"],
                  "extra": {"authentication.kubernetes.io/node-name": ["node-a"]}},
        _jwt(3): {"username": AGENT_SA, "audiences": ["other"],
                  "extra": {"authentication.kubernetes.io/node-name": ["node-a"]}},
        # an older cluster: no node claim, the bound pod says where it runs
        _jwt(4): {"username": AGENT_SA, "audiences": ["dabbawala-join"],
                  "extra": {"authentication.kubernetes.io/pod-name": ["dabba-agent-x1"],
                            "authentication.kubernetes.io/pod-uid": ["u-1"]}},
        _jwt(5): {"username": AGENT_SA, "audiences": ["dabbawala-join"],
                  "extra": {"authentication.kubernetes.io/pod-name": ["dabba-agent-x1"],
                            "authentication.kubernetes.io/pod-uid": ["u-old"]}},
    }  # fmt: skip
    cfg = ControlConfig(
        state_dir=str(tmp_path / "state"), registry_dir="", listen="127.0.0.1:0",
        join_listen="127.0.0.1:0", server_names=["127.0.0.1"], source="kubernetes",
        kubeconfig=kubeconfig, kube_list_s=3600,
        join_service_account="dabbawala-system/dabba-agent",
    )  # fmt: skip
    loop = asyncio.new_event_loop()
    srv = ControlServer(cfg)
    loop.run_until_complete(srv.start())
    try:

        def try_join(node, token):
            try:
                loop.run_until_complete(
                    join(f"127.0.0.1:{srv.join_port}", srv.cp.ca.bundle_pem(), node, token, "")
                )
                return "joined"
            except DabbaError as e:
                return str(e)

        assert try_join("node-a", _jwt(1)) == "joined"
        assert try_join("node-a", _jwt(1)) == "joined"  # a token is not used up by a join
        assert "runs on node 'node-a', not 'node-b'" in try_join("node-b", _jwt(1))
        assert "not the agent's" in try_join("node-a", _jwt(2))
        assert "invalid bearer token" in try_join("node-a", _jwt(3))  # another audience
        assert "invalid bearer token" in try_join("node-a", _jwt(9))  # unknown
        assert try_join("node-b", _jwt(4)) == "joined"  # via the pod: it runs on node-b
        assert "is gone" in try_join("node-b", _jwt(5))
        assert any(r == "POST /apis/authentication.k8s.io/v1/tokenreviews" for r in a.requests)
        # one-time tokens keep working beside it
        assert try_join("node-c", srv.cp.tokens.create("node-c", 60)) == "joined"
    finally:
        loop.run_until_complete(srv.stop())
        loop.close()


def test_hostile_kubernetes_objects_never_take_the_list_down(objs):
    """Istio objects and pods of any shape (hypothesis): translate() always returns a state; each
    object it cannot honour is named in a warning; nothing it keeps has a name that is not a
    Kubernetes name; every policy it keeps is a valid one or a fail-closed stand-in."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from agent.control import validate

    pods, svcs, slices, authz, pa = objs
    leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=12),
                     st.sampled_from(["..", "CUSTOM", "DENY", "STRICT", "caf\u00e9", "a/b"]))  # fmt: skip
    value = st.recursive(
        leaf,
        lambda i: st.one_of(st.lists(i, max_size=3), st.dictionaries(st.text(max_size=8), i, max_size=3)),
        max_leaves=10,
    )  # fmt: skip
    meta = st.fixed_dictionaries({"name": value, "namespace": value})
    obj = st.fixed_dictionaries(
        {"apiVersion": st.just("security.istio.io/v1"), "metadata": meta, "spec": value}
    )

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(st.lists(obj, max_size=3), st.lists(obj, max_size=3))
    def check(bad_authz, bad_pa):
        st_ = translate(pods, svcs, slices, authz + bad_authz, pa + bad_pa)
        for p in [*st_.authz.values(), *st_.peerauth.values()]:
            assert validate.namespace_error(p.namespace) is None, p
            assert validate.name_error(p.name) is None, p

    check()


def test_waypoints_routing_objects_translate_and_a_bad_one_is_refused_alone(objs):
    """Gateway, VirtualService, DestinationRule (and HTTPRoute) from the cluster, parsed by the
    file registry's code: a DestinationRule whose subset no pod matches is dropped, saying
    which and why; the Gateway and a VirtualService that does not need it stay."""
    import copy

    pods, svcs, slices, authz, pa = objs
    api = ApiClient()
    wp_pod = api.sanitize_for_serialization(pods[0])
    wp_pod = copy.deepcopy(wp_pod)
    wp_pod["metadata"].update(name="wp-5f6d", namespace="shop",
                              labels={"gateway.networking.k8s.io/gateway-name": "wp"})  # fmt: skip
    wp_pod["spec"]["serviceAccountName"] = "wp"
    wp_pod["status"]["podIP"] = "10.20.9.9"
    wp_pod["status"]["podIPs"] = [{"ip": "10.20.9.9"}]
    web = api.sanitize_for_serialization(svcs[0])
    web["metadata"]["labels"] = {"istio.io/use-waypoint": "wp"}
    routing = [
        ("Gateway", {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                     "metadata": {"name": "wp", "namespace": "shop"},
                     "spec": {"gatewayClassName": "istio-waypoint"}, "status": {}}),
        ("VirtualService", {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                            "metadata": {"name": "web", "namespace": "shop"},
                            "spec": {"hosts": ["web"], "http": [{"timeout": "2s", "route": [
                                {"destination": {"host": "web"}}]}]}}),
        ("DestinationRule", {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                             "metadata": {"name": "web", "namespace": "shop"},
                             "spec": {"host": "web", "subsets": [
                                 {"name": "v3", "labels": {"version": "v3"}}]}}),
    ]  # fmt: skip
    st = translate(
        [*pods, _models([wp_pod], "V1Pod")[0]], [_models([web], "V1Service")[0], *svcs[1:]],
        slices, authz, pa, routing=routing,
    )  # fmt: skip
    assert list(st.waypoints) == ["shop/wp"] and [w.key for w in st.waypoint_pods("shop/wp")] == [
        "shop/wp-5f6d"]  # fmt: skip
    assert st.waypoint_of(st.services["shop/web"]) == "shop/wp"
    assert list(st.virtual_services) == ["shop/web"] and st.destination_rules == {}
    refused = [w for w in st.warnings if "refused on its own" in w]
    assert len(refused) == 1 and refused[0].startswith("k8s:DestinationRule/shop/web:"), refused
    assert "subset v3 (version=v3) matches none of shop/web's pods" in refused[0]
