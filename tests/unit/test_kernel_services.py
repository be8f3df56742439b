"""What the agent writes to the kernel's service maps (agent/node/services.py), and the merged
15020 exposition when the agent and the tunnel both count Istio connections."""

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from agent.control.proto import control_pb2 as pb
from agent.node.services import compile_services
from agent.ztunnel.metrics import merge_exposition


def _snap(services, n_workloads=4):
    snap = pb.Snapshot()
    for i in range(n_workloads):
        snap.workloads.add(name=f"w{i}", namespace="default", ip=f"10.0.0.{i + 1}",
                           ip6=f"fd00::{i + 1}" if i % 2 == 0 else "")  # fmt: skip
    for s in services:
        snap.services.add(**s)
    return snap


def _svc(name, vip, endpoints, policy="", ports=((80, 9000),)):
    return {
        "name": name,
        "namespace": "default",
        "vip": vip,
        "endpoints": endpoints,
        "lb_policy": policy,
        "ports": [pb.ServicePort(port=p, target_port=t) for p, t in ports],
    }


def test_each_vip_port_gets_its_endpoints_in_order_with_its_target_port_and_policy():
    snap = _snap([
        _svc("web", "10.96.0.1", ["default/w2", "default/w0", "default/gone"], "least_connections",
             ports=((80, 9000), (443, 9443))),
        _svc("v6", "fd00:96::1", ["default/w0", "default/w1", "default/w2"]),
    ])  # fmt: skip
    got, left_out = compile_services(snap)
    assert got == {
        ("10.96.0.1", 80): ("least_connections", 9000, ["10.0.0.3", "10.0.0.1"]),
        ("10.96.0.1", 443): ("least_connections", 9443, ["10.0.0.3", "10.0.0.1"]),
        # an IPv6 VIP reaches its endpoints' IPv6 addresses; w1 has none
        ("fd00:96::1", 80): ("round_robin", 9000, ["fd00::1", "fd00::3"]),
    }
    assert left_out == {}


def test_what_the_kernel_cannot_hold_is_left_to_the_tunnel_saying_why():
    many = [f"default/w{i}" for i in range(70)]
    snap = _snap([
        _svc("big", "10.96.0.2", many),
        _svc("odd", "10.96.0.3", ["default/w0"], "maglev"),
        _svc("bad", "not-an-ip", ["default/w0"]),
    ], n_workloads=70)  # fmt: skip
    got, left_out = compile_services(snap)
    assert got == {}
    assert left_out == {
        "default/big": "70 endpoints, more than the kernel's 64",
        "default/odd": "lbPolicy 'maglev' is not one the kernel knows",
        "default/bad": "its VIP 'not-an-ip' is not an address",
    }


def _text(values: dict[str, float], name="istio_tcp_connections_opened") -> str:
    class C:
        def collect(self):
            m = CounterMetricFamily(name, "TCP connections opened", labels=["reporter"])
            for k, v in values.items():
                m.add_metric([k], v)
            yield m

    r = CollectorRegistry()
    r.register(C())
    return generate_latest(r).decode()


def test_a_family_both_expose_is_one_family_with_the_sums():
    tunnel = _text({"source": 2, "destination": 1}) + _text({"x": 1}, "dabba_tunnel_only")
    agent = _text({"destination": 5}) + _text({"y": 3}, "dabba_agent_only")
    text = merge_exposition(tunnel, agent)
    assert text.count("# TYPE istio_tcp_connections_opened_total counter") == 1
    got = {
        (f.name, s.labels.get("reporter")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert got == {
        ("istio_tcp_connections_opened", "source"): 2,
        ("istio_tcp_connections_opened", "destination"): 6,
        ("dabba_tunnel_only", "x"): 1,
        ("dabba_agent_only", "y"): 3,
    }
