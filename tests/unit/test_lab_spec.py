"""Lab cluster files: parsing and errors with file and line."""

import pytest

from agent.errors import DabbaError
from agent.lab import spec


def test_default_spec_names_and_spreads_pods():
    s = spec.default_spec(3, 2)
    assert s.node_names() == ["n1", "n2", "n3"]
    assert [p.name for p in s.pods if p.node == "n2"] == ["n2-p1", "n2-p2"]


def test_cluster_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "nodes: 2\n"
        "pods:\n"
        "  - {name: client, serviceAccount: sleep, labels: {app: sleep}}\n"
        "  - {name: web-1, node: n2, namespace: shop, labels: {app: web}}\n"
        "services:\n"
        "  - {name: web, namespace: shop, vip: 10.96.0.10, ports: [{port: 80, targetPort: 8080}],"
        " selector: {app: web}, labels: {istio.io/use-waypoint: wp}}\n"
    )
    s = spec.load_spec(str(f))
    assert [(p.name, p.node, p.namespace, p.service_account) for p in s.pods] == [
        ("client", "n1", "default", "sleep"),
        ("web-1", "n2", "shop", "default"),
    ]
    assert s.services[0].ports[0].target_port == 8080 and s.services[0].selector == {"app": "web"}
    assert s.services[0].labels == {"istio.io/use-waypoint": "wp"}  # they reach the registry


@pytest.mark.parametrize(
    "body,msg",
    [
        ("pods:\n  - {name: a, node: n9}\n", "c.yaml:2: pod a: node 'n9' does not exist"),
        ("pods:\n  - {name: a}\n  - {name: a}\n", "c.yaml:3: pod name 'a' is used twice"),
        ("pods:\n  - {name: Bad_Name}\n", "c.yaml:2: pod name 'Bad_Name'"),
        ("services:\n  - {name: s, vip: 999.1.1.1, ports: [80]}\n", "c.yaml:2: service s: vip"),
        (
            "services:\n  - {name: s, vip: 10.96.0.1, ports: [80], labels: [a]}\n",
            "c.yaml:2: service s: labels must be a mapping",
        ),
        ("nodes: two\n", "c.yaml:1: nodes must be a number"),
        ("colour: blue\n", "c.yaml:1: unknown field 'colour'"),
        ("pods: [\n", "c.yaml:2: not valid YAML"),
    ],
)
def test_bad_cluster_file(tmp_path, body, msg):
    f = tmp_path / "c.yaml"
    f.write_text(body)
    with pytest.raises(DabbaError) as e:
        spec.load_spec(str(f))
    assert str(e.value).startswith(
        str(tmp_path / msg.split(":")[0]) + ":" + msg.split(":", 1)[1].split(":")[0]
    )
    assert msg.split(": ", 1)[1] in str(e.value)


def test_counts_are_bounded():
    with pytest.raises(DabbaError, match="--nodes must be between 1 and"):
        spec.default_spec(0, 1)


def test_a_lab_services_labels_reach_the_registry(tmp_path):
    """The lab writes its services to the registry with their labels, which the registry reads
    (a service opting into a waypoint is then refused, saying so: the control plane's README)."""
    from types import SimpleNamespace

    import yaml

    from agent.control.registry import load_dir
    from agent.lab.mesh import registry_docs

    svc = {"name": "web", "namespace": "shop", "vip": "10.96.0.10", "selector": {"app": "web"},
           "lb_policy": "round_robin", "ports": [{"port": 80, "target_port": 8080}],
           "labels": {"istio.io/use-waypoint": "wp"}}  # fmt: skip
    lab = SimpleNamespace(pods=[], services=[svc], waypoints=[])
    (tmp_path / "lab.yaml").write_text(yaml.safe_dump_all(registry_docs(lab)))
    st = load_dir(str(tmp_path))
    assert st.services["shop/web"].labels == {"istio.io/use-waypoint": "wp"}
    assert st.waypoint_of(st.services["shop/web"]) == "shop/wp"
