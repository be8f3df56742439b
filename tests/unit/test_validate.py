"""Names, namespaces, labels and identities, as Kubernetes defines them (agent/control/validate.py)."""

import pytest

from agent.control import validate as v

TD = "cluster.local"


@pytest.mark.parametrize("ns", ["default", "a", "kube-system", "x" * 63, "0abc"])
def test_namespaces_that_kubernetes_accepts(ns):
    assert v.namespace_error(ns) is None


@pytest.mark.parametrize(
    "ns",
    [
        "",
        "..",
        ".",
        "identity/..",
        "Default",
        "a_b",
        "-a",
        "a-",
        "x" * 64,
        "ns\u00e9",
        "a.b",
        7,
        None,
    ],
)
def test_namespaces_that_it_refuses_say_why(ns):
    err = v.namespace_error(ns)
    assert err and "is not a DNS-1123 label" in err and repr(ns)[:20] in err


@pytest.mark.parametrize("name", ["web", "web-1", "a.b.c", "x" * 63, ".".join(["x" * 63] * 3)])
def test_names_that_kubernetes_accepts(name):
    assert v.name_error(name) is None


@pytest.mark.parametrize("name", ["", "..", "a..b", "a/b", "Web", "caf\u00e9", "a" * 254, ["a"]])
def test_names_that_it_refuses_say_why(name):
    err = v.name_error(name, "service account")
    assert err and err.startswith("service account ") and "DNS-1123 subdomain" in err


def test_labels():
    assert v.label_error("app", "web") is None
    assert v.label_error("app.kubernetes.io/name", "Web_1.x") is None
    assert v.label_error("app", "") is None  # an empty value is a value
    assert "label key" in v.label_error("bad key", "x")
    assert "label key" in v.label_error("Bad_Prefix/x", "x")
    assert "value" in v.label_error("app", "a" * 64)
    assert "must be strings" in v.label_error("app", 5)


@pytest.mark.parametrize(
    "ident,want",
    [
        (f"spiffe://{TD}/ns/default/sa/web", ("default", "web")),
        (f"spiffe://{TD}/node/n1", None),  # a node's own identity
        (f"spiffe://{TD}/control", None),  # the control plane's
        ("spiffe://other.example/ns/default/sa/web", None),
        (f"spiffe://{TD}/ns/default/sa/web/x", None),
        (f"spiffe://{TD}/ns/../sa/web", None),
        (f"spiffe://{TD}/ns//sa/web", None),
        (f"spiffe://{TD}/ns/default/sa/", None),
        (f"spiffe://{TD}.evil/ns/default/sa/web", None),
        ("", None),
        (None, None),
    ],
)
def test_only_workload_identities_of_the_trust_domain_are_workloads(ident, want):
    assert v.workload_identity(ident, TD) == want
