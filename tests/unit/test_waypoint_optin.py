"""Opting a service into a waypoint (Istio's istio.io/use-waypoint) while this mesh runs none:
the opt-in is read from the Service and from its Namespace, said at load with where it was
written, and the service is sent to the nodes without endpoints and with its waypoint, so
that its connections are refused, saying why, rather than carried without its L7 rules (the
complaint users have of Istio: a missing waypoint made traffic go direct, silently). Before,
the label was read and dropped.

The refusal itself, from the kernel and from the tunnel, is tried in
tests/cluster/test_kernel_services.py."""

import json
import textwrap
import time
from types import SimpleNamespace

import pytest

from agent.bpf import abi
from agent.bpf.flows import FlowRecord
from agent.control import model as m
from agent.control.kube import translate
from agent.control.registry import RegistryError, load_dir
from agent.control.server import ControlConfig, ControlPlane
from agent.node.flowtable import FlowTable

REG = textwrap.dedent("""\
    apiVersion: dabbawala.io/v1
    kind: Workload
    metadata: {name: web-1, namespace: shop, labels: {app: web}}
    spec: {serviceAccount: web, node: n1, ip: 10.20.1.11}
    ---
    apiVersion: dabbawala.io/v1
    kind: Service
    metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: shop-waypoint}}
    spec: {vip: 10.96.0.10, ports: [80], selector: {app: web}}
    ---
    apiVersion: dabbawala.io/v1
    kind: Service
    metadata: {name: plain, namespace: shop}
    spec: {vip: 10.96.0.11, ports: [80], selector: {app: web}}
    ---
    apiVersion: dabbawala.io/v1
    kind: Service
    metadata:
      name: billing
      namespace: pay
      labels: {istio.io/use-waypoint: none}
    spec: {vip: 10.96.0.12, ports: [80], selector: {app: web}}
    ---
    apiVersion: dabbawala.io/v1
    kind: Service
    metadata: {name: ledger, namespace: pay}
    spec: {vip: 10.96.0.13, ports: [80], selector: {app: web}}
    ---
    apiVersion: v1
    kind: Namespace
    metadata:
      name: pay
      labels: {istio.io/use-waypoint: pay-wp, team: money}
    ---
    apiVersion: dabbawala.io/v1
    kind: Service
    metadata:
      name: other
      namespace: shop
      labels: {istio.io/use-waypoint: edge, istio.io/use-waypoint-namespace: infra}
    spec: {vip: 10.96.0.14, ports: [80], selector: {app: web}}
    """)


def test_the_opt_in_is_read_from_the_service_and_its_namespace_and_said_at_load(tmp_path):
    (tmp_path / "mesh.yaml").write_text(REG)
    st = load_dir(str(tmp_path))
    assert st.namespaces == {"pay": {"istio.io/use-waypoint": "pay-wp", "team": "money"}}
    got = {k: st.waypoint_of(s) for k, s in st.services.items()}
    assert got == {
        "shop/web": "shop/shop-waypoint",  # the Service's own label
        "shop/plain": "",  # none: carried at L4 as before
        "pay/billing": "",  # "none" opts out of its namespace's waypoint
        "pay/ledger": "pay/pay-wp",  # its namespace's
        "shop/other": "infra/edge",  # a waypoint in another namespace
    }
    path = str(tmp_path / "mesh.yaml")  # each document where it starts
    assert st.warnings == [
        f"{path}:24: " + m.waypoint_refusal("pay/ledger", "pay/pay-wp"),
        f"{path}:35: " + m.waypoint_refusal("shop/other", "infra/edge"),
        f"{path}:6: " + m.waypoint_refusal("shop/web", "shop/shop-waypoint"),
    ]
    assert st.warnings[2].endswith(
        "service shop/web opts into waypoint shop/shop-waypoint (istio.io/use-waypoint) and no "
        "Gateway (class istio-waypoint) defines it: connections to the service are refused "
        "rather than carried without its L7 routing and policies (remove the label, or set it "
        "to none, to carry them at L4)"
    )


@pytest.mark.parametrize(
    "text,where,msg",
    [
        ("apiVersion: v1\nkind: Namespace\nmetadata: {labels: {a: b}}\n", "x.yaml:3",
         "metadata.name is required"),
        ("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\nspec: {finalizers: [k]}\n",
         "x.yaml:4", "a Namespace takes metadata (name, labels) only here"),
        ("apiVersion: v1\nkind: Namespace\nmetadata: {name: a, uid: x}\n", "x.yaml:3",
         "unknown field 'uid'"),
        ("apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {k: [1]}}\n", "x.yaml:3",
         "metadata.labels"),
        ("apiVersion: dabbawala.io/v1\nkind: Namespace\nmetadata: {name: a}\n", "x.yaml:1",
         "Namespace needs apiVersion v1"),
        ("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n"
         "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n", "x.yaml:7",
         "Namespace a is defined twice"),
    ],
)  # fmt: skip
def test_bad_namespace_documents_name_file_line_and_reason(tmp_path, text, where, msg):
    (tmp_path / "x.yaml").write_text(text)
    with pytest.raises(RegistryError) as e:
        load_dir(str(tmp_path))
    assert str(e.value).startswith(str(tmp_path / where)), str(e.value)
    assert msg in str(e.value)


def test_nodes_get_the_service_without_endpoints_and_with_its_waypoint(tmp_path):
    reg = tmp_path / "registry"
    reg.mkdir()
    (reg / "mesh.yaml").write_text(REG)
    cp = ControlPlane(
        ControlConfig(state_dir=str(tmp_path / "state"), registry_dir=str(reg), listen="x:1")
    )
    snap = cp.snapshot_for("n1")
    got = {f"{s.namespace}/{s.name}": (list(s.endpoints), s.waypoint) for s in snap.services}
    assert got == {
        "shop/web": ([], "shop/shop-waypoint"),
        "shop/plain": (["shop/web-1"], ""),
        "pay/billing": ([], ""),  # its selector picks no workload of its namespace
        "pay/ledger": ([], "pay/pay-wp"),
        "shop/other": ([], "infra/edge"),
    }


def test_kubernetes_services_and_namespaces_carry_the_opt_in():
    def svc(name, ns, labels):
        return {"metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {"cluster_ip": "10.96.0.20", "ports": [{"port": 80}],
                         "selector": {"app": "x"}}}  # fmt: skip

    st = translate(
        [],
        [svc("a", "front", {"istio.io/use-waypoint": "wp"}), svc("b", "back", None)],
        [],
        [],
        [],
        namespaces=[{"metadata": {"name": "back", "labels": {"istio.io/use-waypoint": "bw"}}}],
    )
    assert {k: st.waypoint_of(s) for k, s in st.services.items()} == {
        "front/a": "front/wp",
        "back/b": "back/bw",
    }
    assert st.warnings == [
        "k8s:Service/back/b: " + m.waypoint_refusal("back/b", "back/bw"),
        "k8s:Service/front/a: " + m.waypoint_refusal("front/a", "front/wp"),
    ]


def test_a_refused_connect_to_such_a_service_says_why():
    web = SimpleNamespace(name="web", namespace="front", ip="10.0.0.1",
                          spiffe_id="spiffe://td/ns/front/sa/web", labels={})  # fmt: skip
    svc = SimpleNamespace(
        name="api", namespace="back", vip="10.96.0.5", waypoint="back/wp", waypoint_refusal=""
    )
    t = FlowTable(10, {7: web}.get, {}.get, set, service_of={"10.96.0.5": svc}.get)
    now = time.time()
    t.on_closed(
        FlowRecord(
            1,
            7,
            "outbound",
            ("10.0.0.1", 40000),
            ("10.96.0.5", 80),
            ("10.96.0.5", 80),
            False,
            0,
            0,
            0,
            0,
            0,
            0,
            now,
            now,
            "refused",
            "CLOSE",
            refused=abi.REFUSAL_REASONS[abi.Refusal.NO_ENDPOINT],
        )  # fmt: skip
    )
    t.tick()
    (v,) = t.recent()
    assert (v["verdict"], v["path"]) == ("deny", "denied")
    assert v["reason"] == "refused in the kernel: " + m.waypoint_refusal("back/api", "back/wp")
    assert json.loads(json.dumps(v)) == v  # the view stays JSON
