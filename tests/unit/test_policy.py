"""Istio L4 AuthorizationPolicy semantics: a matrix of cases, each from real YAML through the registry."""

import textwrap

import pytest

from agent.control.registry import load_dir
from agent.ztunnel.policy import Request, evaluate

WORKLOADS = """\
apiVersion: dabbawala.io/v1
kind: Workload
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {serviceAccount: web, node: n1, ip: 10.20.1.11}
---
apiVersion: dabbawala.io/v1
kind: Workload
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {serviceAccount: db, node: n1, ip: 10.20.1.12}
"""

FRONT = "spiffe://cluster.local/ns/front/sa/sleep"
ADMIN = "spiffe://cluster.local/ns/ops/sa/admin"
SHOP = "spiffe://cluster.local/ns/shop/sa/web"


def policies(tmp_path, text):
    (tmp_path / "w.yaml").write_text(WORKLOADS)
    (tmp_path / "p.yaml").write_text(textwrap.dedent(text))
    st = load_dir(str(tmp_path))
    return st, list(st.authz.values())


def check(tmp_path, text, workload, src_identity, port=8080, src_ip="10.20.2.11"):
    st, pols = policies(tmp_path, text)
    w = st.workloads[workload]
    return evaluate(pols, w, Request(src_ip, w.ip, port, src_identity))


AP = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"

CASES = [
    # (name, policy YAML, workload, source identity, port, source ip, allowed, reason contains)
    (
        "no policy allows",
        "",
        "shop/web",
        FRONT,
        8080,
        "10.20.2.11",
        True,
        "no ALLOW policy applies",
    ),
    (
        "allow by principal",
        AP + "metadata: {name: a, namespace: shop}\nspec:\n  rules:\n"
        "  - from: [{source: {principals: [cluster.local/ns/front/sa/sleep]}}]\n",
        "shop/web",
        FRONT,
        8080,
        "10.20.2.11",
        True,
        "allowed by ALLOW policy shop/a rule 0",
    ),
    (
        "allow by principal, other principal denied",
        AP + "metadata: {name: a, namespace: shop}\nspec:\n  rules:\n"
        "  - from: [{source: {principals: [cluster.local/ns/front/sa/sleep]}}]\n",
        "shop/web",
        ADMIN,
        8080,
        "10.20.2.11",
        False,
        "no rule of the ALLOW policies that apply matched (shop/a)",
    ),
    (
        "deny by namespace",
        AP + "metadata: {name: d, namespace: shop}\nspec:\n  action: DENY\n  rules:\n"
        "  - from: [{source: {namespaces: [ops]}}]\n",
        "shop/web",
        ADMIN,
        8080,
        "10.20.2.11",
        False,
        "denied by DENY policy shop/d rule 0",
    ),
    (
        "deny by namespace, other namespace allowed",
        AP + "metadata: {name: d, namespace: shop}\nspec:\n"
        "  action: DENY\n  rules:\n  - from: [{source: {namespaces: [ops]}}]\n",
        "shop/web",
        FRONT,
        8080,
        "10.20.2.11",
        True,
        "no ALLOW policy applies",
    ),
    (
        "notPorts excludes",
        AP + "metadata: {name: a, namespace: shop}\nspec:\n  rules:\n"
        "  - to: [{operation: {notPorts: ['9090']}}]\n",
        "shop/web",
        FRONT,
        9090,
        "10.20.2.11",
        False,
        "no rule",
    ),
    (
        "notPorts allows others",
        AP + "metadata: {name: a, namespace: shop}\nspec:\n  rules:\n"
        "  - to: [{operation: {notPorts: ['9090']}}]\n",
        "shop/web",
        FRONT,
        8080,
        "10.20.2.11",
        True,
        "allowed by ALLOW policy shop/a",
    ),
    (
        "ipBlocks",
        AP + "metadata: {name: a, namespace: shop}\nspec:\n  rules:\n"
        "  - from: [{source: {ipBlocks: [10.20.2.0/24]}}]\n",
        "shop/web",
        None,
        8080,
        "10.20.2.11",
        True,
        "allowed by ALLOW policy shop/a",
    ),
    (
        "ipBlocks outside",
        AP + "metadata: {name: a, namespace: shop}\nspec:\n  rules:\n"
        "  - from: [{source: {ipBlocks: [10.20.2.0/24]}}]\n",
        "shop/web",
        None,
        8080,
        "10.20.3.5",
        False,
        "no rule",
    ),
    (
        "an ALLOW that matches nothing denies",
        AP + "metadata: {name: nothing, namespace: shop}\nspec: {}\n",
        "shop/web",
        FRONT,
        8080,
        "10.20.2.11",
        False,
        "shop/nothing",
    ),
    (
        "DENY overrides ALLOW",
        AP
        + "metadata: {name: a, namespace: shop}\nspec:\n  rules: [{}]\n---\n"
        + AP
        + "metadata: {name: d, namespace: shop}\nspec:\n  action: DENY\n  rules:\n"
        "  - to: [{operation: {ports: ['8080']}}]\n",
        "shop/web",
        FRONT,
        8080,
        "10.20.2.11",
        False,
        "denied by DENY policy shop/d",
    ),
    (
        "L7 field in ALLOW never matches",
        AP + "metadata: {name: a, namespace: shop}\nspec:\n  rules:\n"
        "  - to: [{operation: {methods: [GET]}}]\n",
        "shop/web",
        FRONT,
        8080,
        "10.20.2.11",
        False,
        "no rule",
    ),
    (
        "L7 field in DENY matches all",
        AP + "metadata: {name: d, namespace: shop}\nspec:\n  action: DENY\n"
        "  rules:\n  - to: [{operation: {paths: [/admin]}}]\n",
        "shop/web",
        FRONT,
        8080,
        "10.20.2.11",
        False,
        "L7 field to.operation.paths fails safe",
    ),
    (
        "plaintext peer matches no principal",
        AP + "metadata: {name: a, namespace: shop}\nspec:\n  rules:\n"
        "  - from: [{source: {principals: ['*']}}]\n",
        "shop/web",
        None,
        8080,
        "10.20.2.11",
        False,
        "no rule",
    ),
    (
        "any authenticated principal",
        AP + "metadata: {name: a, namespace: shop}\nspec:\n  rules:\n"
        "  - from: [{source: {principals: ['*']}}]\n",
        "shop/web",
        ADMIN,
        8080,
        "10.20.2.11",
        True,
        "allowed",
    ),
    (
        "selector scopes the policy",
        AP + "metadata: {name: a, namespace: shop}\nspec:\n"
        "  selector: {matchLabels: {app: db}}\n  rules: []\n",
        "shop/web",
        FRONT,
        8080,
        "10.20.2.11",
        True,
        "no ALLOW policy applies",
    ),
    (
        "mesh-wide policy in the root namespace",
        AP + "metadata: {name: m, namespace: istio-system}\nspec:\n"
        "  action: DENY\n  rules:\n  - from: [{source: {notNamespaces: [front, shop]}}]\n",
        "shop/db",
        ADMIN,
        5432,
        "10.20.2.11",
        False,
        "denied by DENY policy istio-system/m",
    ),
    (
        "namespace policy does not reach another namespace",
        AP + "metadata: {name: d, namespace: front}\nspec:\n  action: DENY\n  rules: [{}]\n",
        "shop/web",
        FRONT,
        8080,
        "10.20.2.11",
        True,
        "no ALLOW policy applies",
    ),
    (
        "when condition",
        AP + "metadata: {name: a, namespace: shop}\nspec:\n  rules:\n"
        "  - when: [{key: source.principal, values: ['cluster.local/ns/front/*']}]\n",
        "shop/web",
        FRONT,
        8080,
        "10.20.2.11",
        True,
        "allowed",
    ),
    (
        "notPrincipals suffix",
        AP + "metadata: {name: d, namespace: shop}\nspec:\n  action: DENY\n  rules:\n"
        "  - from: [{source: {notPrincipals: ['*/sa/sleep']}}]\n",
        "shop/web",
        SHOP,
        8080,
        "10.20.2.11",
        False,
        "denied by DENY policy shop/d",
    ),
]


@pytest.mark.parametrize(
    "name,text,workload,ident,port,src_ip,allowed,why", CASES, ids=[c[0] for c in CASES]
)
def test_policy_matrix(tmp_path, name, text, workload, ident, port, src_ip, allowed, why):
    d = check(tmp_path, text, workload, ident, port, src_ip)
    assert d.allowed is allowed, d
    assert why in d.reason, d.reason
    if d.policy:
        assert d.origin.startswith(str(tmp_path / "p.yaml") + ":")
