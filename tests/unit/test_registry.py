"""The file registry: good and bad documents, L7 fail-safe, hot reload keeping the last good state."""

import textwrap

import pytest

from agent.control import model as m
from agent.control.registry import FileRegistry, RegistryError, load_dir

GOOD = textwrap.dedent("""\
    apiVersion: dabbawala.io/v1
    kind: Workload
    metadata: {name: web-1, namespace: shop, labels: {app: web, version: v1}}
    spec: {serviceAccount: web, node: n1, ip: 10.20.1.11}
    ---
    apiVersion: dabbawala.io/v1
    kind: Workload
    metadata: {name: client, namespace: front}
    spec: {serviceAccount: sleep, node: n2, ip: 10.20.2.11}
    ---
    apiVersion: dabbawala.io/v1
    kind: Service
    metadata: {name: web, namespace: shop}
    spec:
      vip: 10.96.0.10
      ports: [{port: 80, targetPort: 8080, name: http}]
      selector: {app: web}
      lbPolicy: least_connections
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: allow-front, namespace: shop}
    spec:
      selector: {matchLabels: {app: web}}
      action: ALLOW
      rules:
      - from:
        - source: {principals: ["cluster.local/ns/front/sa/sleep"], notIpBlocks: [10.0.0.0/8]}
        to:
        - operation: {ports: ["8080"], notPorts: [9090]}
        when:
        - {key: source.namespace, values: [front]}
    ---
    apiVersion: security.istio.io/v1beta1
    kind: PeerAuthentication
    metadata: {name: default, namespace: istio-system}
    spec: {mtls: {mode: STRICT}, portLevelMtls: {9090: {mode: PERMISSIVE}}}
    """)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_documents(tmp_path):
    write(tmp_path, "a.yaml", GOOD)
    s = load_dir(str(tmp_path))
    w = s.workloads["shop/web-1"]
    assert (w.service_account, w.node, w.ip, w.labels["app"]) == ("web", "n1", "10.20.1.11", "web")
    assert w.spiffe("cluster.local") == "spiffe://cluster.local/ns/shop/sa/web"
    svc = s.services["shop/web"]
    assert svc.ports == (m.ServicePort(80, 8080, "http"),) and svc.lb_policy == "least_connections"
    assert [x.key for x in s.endpoints(svc)] == ["shop/web-1"]
    p = s.authz["shop/allow-front"]
    assert p.action == "ALLOW" and p.selector == {"app": "web"} and p.applies_to(w)
    r = p.rules[0]
    assert r.sources[0].principals == ("cluster.local/ns/front/sa/sleep",)
    assert r.sources[0].not_ip_blocks == ("10.0.0.0/8",)
    assert r.operations[0].ports == (8080,) and r.operations[0].not_ports == (9090,)
    assert r.conditions[0] == m.Condition("source.namespace", ("front",))
    assert r.l7_fields == () and s.warnings == []
    assert s.peer_mode(w) == "STRICT" and s.peer_mode(w, 9090) == "PERMISSIVE"
    assert p.origin.endswith("a.yaml:20")  # the document starts there


def test_l7_field_fails_safe_with_a_warning_naming_it(tmp_path):
    write(
        tmp_path,
        "p.yaml",
        textwrap.dedent("""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: l7, namespace: shop}
        spec:
          action: ALLOW
          rules:
          - to:
            - operation: {methods: [GET], ports: ["80"]}
        """),
    )
    s = load_dir(str(tmp_path))
    assert s.authz["shop/l7"].rules[0].l7_fields == ("to.operation.methods",)
    assert len(s.warnings) == 1
    assert "p.yaml:7" in s.warnings[0] and "to.operation.methods" in s.warnings[0]
    assert "fails safe and never matches (ALLOW)" in s.warnings[0]


@pytest.mark.parametrize(
    "text,where,msg",
    [
        ("kind: Gadget\napiVersion: dabbawala.io/v1\n", "x.yaml:1", "unknown kind 'Gadget'"),
        (
            "apiVersion: security.istio.io/v1\nkind: Workload\nmetadata: {name: a}\n",
            "x.yaml:1",
            "Workload needs apiVersion dabbawala.io/v1",
        ),
        (
            "apiVersion: dabbawala.io/v1\nkind: Workload\nmetadata: {name: a}\nspec:\n  node: n1\n  ip: 10.1.1\n",
            "x.yaml:6",
            "spec.ip '10.1.1' is not an IPv4 address",
        ),
        (
            "apiVersion: dabbawala.io/v1\nkind: Workload\nmetadata: {name: a}\nspec:\n  node: n1\n"
            "  ip: 10.1.1.1\n  ip6: 10.1.1.2\n",
            "x.yaml:7",
            "spec.ip6 '10.1.1.2' is not an IPv6 address",
        ),
        (
            "apiVersion: dabbawala.io/v1\nkind: Workload\nmetadata: {name: a}\nspec:\n  node: n1\n"
            "  ip: 10.1.1.1\n  ip6: 'fe80::1'\n",
            "x.yaml:7",
            "spec.ip6 'fe80::1' is not a routable IPv6 address",
        ),
        (
            "apiVersion: dabbawala.io/v1\nkind: Workload\nmetadata: {name: a}\nspec:\n  node: n1\n"
            "  ip: 10.1.1.1\n  ip6: '::ffff:10.1.1.1'\n",
            "x.yaml:7",
            "(IPv4-mapped, link-local, loopback, unspecified)",
        ),
        (
            "apiVersion: dabbawala.io/v1\nkind: Service\nmetadata: {name: s}\nspec:\n  vip: 10.96.0.1\n"
            "  ports: [{port: 99999}]\n",
            "x.yaml:6",
            "99999 is out of range",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n"
            "  action: MAYBE\n",
            "x.yaml:5",
            "action 'MAYBE' is not one of",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n"
            "  - from:\n    - source: {ipBlocks: [300.1.1.1]}\n",
            "x.yaml:7",
            "'300.1.1.1' is not an IP address",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n"
            "  - from:\n    - source: {principalz: [a]}\n",
            "x.yaml:7",
            "unknown field 'principalz'",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n  mtls:\n"
            "    mode: STRICTER\n",
            "x.yaml:6",
            "mtls.mode 'STRICTER'",
        ),
        (
            "apiVersion: dabbawala.io/v1\nkind: Workload\nmetadata: {name: a}\nspec: {node: n1, ip: 10.0.0.1}\n---\n"
            "apiVersion: dabbawala.io/v1\nkind: Workload\nmetadata: {name: a}\nspec: {node: n1, ip: 10.0.0.2}\n",
            "x.yaml:8",
            "Workload default/a is defined twice",
        ),
        (
            "apiVersion: dabbawala.io/v1\nkind: Workload\nmetadata: [\n",
            "x.yaml:4",
            "not valid YAML",
        ),
        ("- a list\n", "x.yaml:1", "must be a mapping"),
        # hostile input (before: these crashed the control plane or a node, or wrote into it)
        ("kind: [1]\napiVersion: dabbawala.io/v1\n", "x.yaml:1", "unknown kind [1]"),
        (
            "apiVersion: dabbawala.io/v1\nkind: Workload\nmetadata: {name: identity, namespace: ..}\n"
            "spec: {node: n1, ip: 10.0.0.1}\n",
            "x.yaml:3",
            "metadata.namespace '..' is not a DNS-1123 label",
        ),
        (
            "apiVersion: dabbawala.io/v1\nkind: Workload\nmetadata: {name: a, namespace: caf\u00e9}\n"
            "spec: {node: n1, ip: 10.0.0.1}\n",
            "x.yaml:3",
            "metadata.namespace 'caf\u00e9' is not a DNS-1123 label",
        ),
        (
            "apiVersion: dabbawala.io/v1\nkind: Workload\nmetadata: {name: a}\n"
            "spec: {node: n1, ip: 10.0.0.1, serviceAccount: s\u00e4}\n",
            "x.yaml:4",
            "spec.serviceAccount 's\u00e4' is not a DNS-1123 subdomain",
        ),
        (
            "apiVersion: dabbawala.io/v1\nkind: Workload\nmetadata: {name: a, labels: {app: [1]}}\n"
            "spec: {node: n1, ip: 10.0.0.1}\n",
            "x.yaml:3",
            "keys and values must be strings",
        ),
        (
            "apiVersion: dabbawala.io/v1\nkind: Workload\nmetadata: {name: a}\n"
            "spec: {node: ../n2, ip: 10.0.0.1}\n",
            "x.yaml:4",
            "spec.node name '../n2' is not",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\n"
            "spec:\n  mtls: STRICT\n",
            "x.yaml:5",
            "mtls must be {mode: ...}",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n"
            "  rules:\n  - from:\n    - source: {principals: [{a: 1}]}\n",
            "x.yaml:7",
            "principals must be a string",
        ),
        (
            "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            "c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n",
            "x.yaml:1",
            "YAML anchors and aliases are not accepted",
        ),
    ],
)
def test_bad_documents_name_file_line_and_reason(tmp_path, text, where, msg):
    write(tmp_path, "x.yaml", text)
    with pytest.raises(RegistryError) as e:
        load_dir(str(tmp_path))
    assert str(e.value).startswith(str(tmp_path / where)), str(e.value)
    assert msg in str(e.value)


def test_an_oversized_file_is_refused_unread(tmp_path):
    from agent.control.registry import MAX_FILE_BYTES

    write(tmp_path, "x.yaml", "# " + "x" * MAX_FILE_BYTES + "\n")
    with pytest.raises(RegistryError, match=r"x.yaml:1: \d+ bytes; a registry file may hold"):
        load_dir(str(tmp_path))


def test_hot_reload_applies_good_changes_and_keeps_last_good_state(tmp_path):
    write(tmp_path, "a.yaml", GOOD)
    seen = []
    reg = FileRegistry(str(tmp_path), seen.append)
    assert reg.state.version == 1
    write(
        tmp_path,
        "b.yaml",
        "apiVersion: dabbawala.io/v1\nkind: Workload\nmetadata: {name: new}\n"
        "spec: {node: n2, ip: 10.20.2.12}\n",
    )
    assert reg.poll() is True
    assert reg.state.version == 2 and "default/new" in reg.state.workloads and seen[-1] is reg.state
    write(
        tmp_path,
        "b.yaml",
        "apiVersion: dabbawala.io/v1\nkind: Workload\nmetadata: {name: new}\n"
        "spec: {node: n2, ip: not-an-ip}\n",
    )
    assert reg.poll() is False
    assert reg.state.version == 2 and reg.state.workloads["default/new"].ip == "10.20.2.12"
    assert "b.yaml:4" in reg.last_error
    (tmp_path / "b.yaml").unlink()
    assert (
        reg.poll() is True and reg.state.version == 3 and "default/new" not in reg.state.workloads
    )
    assert reg.last_error is None


def test_duplicate_ip_is_refused(tmp_path):
    write(
        tmp_path,
        "a.yaml",
        "apiVersion: dabbawala.io/v1\nkind: Workload\nmetadata: {name: a}\n"
        "spec: {node: n1, ip: 10.0.0.1}\n---\napiVersion: dabbawala.io/v1\nkind: Workload\n"
        "metadata: {name: b}\nspec: {node: n1, ip: 10.0.0.1}\n",
    )
    with pytest.raises(RegistryError, match="same ip 10.0.0.1"):
        load_dir(str(tmp_path))


def test_a_dual_stack_workload_and_a_duplicate_ipv6_address(tmp_path):
    doc = "apiVersion: dabbawala.io/v1\nkind: Workload\nmetadata: {name: %s}\nspec: {node: n1, ip: %s, ip6: '%s'}\n"
    write(tmp_path, "a.yaml", doc % ("a", "10.0.0.1", "fd00:20:1:0::b"))
    assert load_dir(str(tmp_path)).workloads["default/a"].ip6 == "fd00:20:1::b"  # compressed
    write(tmp_path, "b.yaml", doc % ("b", "10.0.0.2", "fd00:20:1::b"))
    with pytest.raises(RegistryError, match="same ip fd00:20:1::b"):
        load_dir(str(tmp_path))


MESH_WIDE = """\
apiVersion: dabbawala.io/v1
kind: Workload
metadata: {name: web, namespace: shop}
spec: {node: n1, ip: 10.0.0.1}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: %s}
spec: {mtls: {mode: STRICT}}
"""


def test_the_root_namespace_is_istios_and_configurable(tmp_path):
    """Before: the root was dabba-system, so an Istio user's mesh-wide STRICT (in istio-system)
    applied to a namespace without workloads: the mesh stayed PERMISSIVE."""
    write(tmp_path, "a.yaml", MESH_WIDE % "istio-system")
    st = load_dir(str(tmp_path))
    assert st.peer_mode(st.workloads["shop/web"]) == "STRICT"
    st = load_dir(str(tmp_path), root="mesh-root")  # --root-namespace mesh-root
    assert st.peer_mode(st.workloads["shop/web"]) == "PERMISSIVE"  # just a namespace now


def test_a_policy_in_the_old_root_namespace_is_refused_with_what_to_do(tmp_path):
    write(tmp_path, "a.yaml", MESH_WIDE % "dabba-system")
    with pytest.raises(RegistryError) as e:
        load_dir(str(tmp_path))
    assert str(e.value).startswith(
        f"{tmp_path / 'a.yaml'}:6: PeerAuthentication dabba-system/default"
    )
    assert "run the control plane with --root-namespace dabba-system" in str(e.value)
    # which keeps the old meaning
    st = load_dir(str(tmp_path), root="dabba-system")
    assert st.peer_mode(st.workloads["shop/web"]) == "STRICT"


UNSUPPORTED = """\
apiVersion: dabbawala.io/v1
kind: Workload
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {node: n1, ip: 10.0.0.1}
---
apiVersion: dabbawala.io/v1
kind: Workload
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {node: n1, ip: 10.0.0.2}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: shop}
spec: {selector: {matchLabels: {app: web}}, action: CUSTOM, provider: {name: opa}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-sa, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - from: [{source: {serviceAccounts: [front/sleep]}}]
"""


def test_a_valid_istio_object_we_cannot_honour_is_refused_alone_and_fails_closed(tmp_path):
    """Before: one such object (action CUSTOM, source.serviceAccounts) rejected the whole
    registry, so no later change was taken and the control plane could not start."""
    from agent.ztunnel.policy import Request, evaluate

    write(tmp_path, "a.yaml", UNSUPPORTED)
    st = load_dir(str(tmp_path))  # no error: the rest stands
    assert sorted(st.workloads) == ["shop/db", "shop/web"]
    assert [w for w in st.warnings if "a.yaml:14" in w and "action CUSTOM" in w]
    assert [w for w in st.warnings if "a.yaml:22" in w and "source.serviceAccounts" in w]
    for key, app in (("shop/ext", "web"), ("shop/by-sa", "db")):
        p = st.authz[key]
        assert (p.action, p.selector) == ("DENY", {"app": app})
        w = st.workloads[f"shop/{app}"]
        d = evaluate(list(st.authz.values()), w, Request("10.0.0.9", w.ip, 80, "x"))
        assert not d.allowed and "refused by the control plane" in d.reason, d
