"""Agent config: parsing, defaults, and errors that name file, line and field."""

import pytest

from agent.errors import DabbaError
from agent.node import config

GOOD = """\
node: n1
cgroup: /sys/fs/cgroup/unified/pods
tunnel: {address: 10.20.1.1}
capture:
  exclude_cidrs: [127.0.0.0/8, 10.96.0.0/12]
  exclude_ports: [22]
maps: {flows: 1024, ring_pages: 16}
workloads:
  - name: web
    namespace: shop
    service_account: web-sa
    cgroup: /sys/fs/cgroup/unified/pods/web
    strict: true
"""


def test_good_config_with_defaults():
    c = config.parse(GOOD, "a.yaml")
    assert c.node == "n1" and c.pin_name == "n1" and c.state_dir == "/run/dabba/n1"
    assert c.tunnel.port == 15001 and c.tunnel_addresses == ["10.20.1.1"]
    assert c.capture.exclude_ports == [22] and c.capture.non_tcp == "dns"
    assert c.capture.packet_sockets == "refuse"  # the default: refused, or no start
    assert c.maps.flows == 1024 and c.maps.ring_pages == 16 and c.maps.captures == 16384
    w = c.workloads[0]
    assert (w.namespace, w.service_account, w.capture, w.strict) == ("shop", "web-sa", True, True)
    assert w.spiffe_suffix == "ns/shop/sa/web-sa"
    assert "source" not in c.dump()
    assert c.tunnel.address6 == "" and c.tunnel_source(6) == ""  # native IPv6: refused


def test_tunnel_spread_ports_default_and_off():
    assert config.parse(GOOD, "a.yaml").tunnel.spread == (20000, 1024)
    one = GOOD.replace("tunnel: {address: 10.20.1.1}", "tunnel: {address: 10.20.1.1, spread: ''}")
    assert config.parse(one, "a.yaml").tunnel.spread == (0, 0)
    own = GOOD.replace("{address: 10.20.1.1}", "{address: 10.20.1.1, spread: 30000-30009}")
    assert config.parse(own, "a.yaml").tunnel.spread == (30000, 10)


def test_dual_stack_tunnel_sources_default_to_both_listeners():
    c = config.parse(
        GOOD.replace("{address: 10.20.1.1}", "{address: 10.20.1.1, address6: 'fd00:20:1:0::1'}")
    )
    assert c.tunnel.address6 == "fd00:20:1::1"  # as the kernel and the tunnel print it
    assert c.tunnel_addresses == ["10.20.1.1", "fd00:20:1::1"]
    assert (c.tunnel_source(4), c.tunnel_source(6)) == ("10.20.1.1", "fd00:20:1::1")


@pytest.mark.parametrize(
    "text,where,msg",
    [
        ("node: n1\ncgroup: /x\n", "a.yaml", "missing required field 'tunnel'"),
        (
            "node: n1\ncgroup: /x\ntunnel: {address: 10.0.0.1}\nbogus: 1\n",
            "a.yaml:4",
            "unknown field 'bogus'",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel:\n  address: 10.0.0.300\n",
            "a.yaml:4",
            "is not an IPv4 address",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel: {address: 10.0.0.1, port: 70000}\n",
            "a.yaml:3",
            "out of range",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel: {address: 10.0.0.1}\nmaps:\n  ring_pages: 3\n",
            "a.yaml:5",
            "power of two",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel: {address: 10.0.0.1}\ncapture:\n  exclude_cidrs:\n    - 10.0.0.0/40\n",
            "a.yaml:6",
            "'10.0.0.0/40' is not an IPv4 or IPv6 CIDR",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel:\n  address: 10.0.0.1\n  address6: fe80::1\n",
            "a.yaml:5",
            "tunnel.address6: 'fe80::1' cannot be the tunnel's listener (IPv4-mapped, link-local",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel:\n  address: 10.0.0.1\n  address6: 10.0.0.2\n",
            "a.yaml:5",
            "tunnel.address6: '10.0.0.2' is not an IPv6 address",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel: {address: 10.0.0.1, address6: 'fd00::1'}\n"
            "tunnel_addresses: [10.0.0.1]\n",
            "a.yaml:4",
            "tunnel_addresses: tunnel.address6 is set but no IPv6 address is listed",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel: {address: 10.0.0.1}\ntunnel_addresses: [10.0.0.1, 'fd00::x']\n",
            "a.yaml:4",
            "tunnel_addresses: 'fd00::x' is not an IPv4 or IPv6 address",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel: {address: 10.0.0.1}\nworkloads:\n  - name: a\n    cgroup: /a\n"
            "  - name: a\n    cgroup: /b\n",
            "a.yaml:7",
            "listed twice",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel: {address: 10.0.0.1}\nworkloads:\n  - name: a\n    cgroup: /a\n"
            "    color: red\n",
            "a.yaml:7",
            "unknown field 'color'",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel: {address: 10.0.0.1}\ncapture:\n  non_tcp: allow\n",
            "a.yaml:5",
            "capture.non_tcp: 'allow' is not one of dns, pass",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel: {address: 10.0.0.1}\ncapture:\n  max_connections: -1\n",
            "a.yaml:5",
            "capture.max_connections: -1 is not a whole number (0: no limit)",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel: {address: 10.0.0.1}\ncapture:\n  packet_sockets: allow\n",
            "a.yaml:5",
            "capture.packet_sockets: 'allow' is not one of refuse, refuse-where-able",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel: {address: 10.0.0.1}\nservices:\n  max_ejected: 2\n",
            "a.yaml:5",
            "services.max_ejected: 2 is not a share from 0 to 1",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel: {address: 10.0.0.1}\nservices:\n  eject_after: x\n",
            "a.yaml:5",
            "services.eject_after: 'x' is not a whole number from 0 (0: never eject) to 65535",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel: {address: 10.0.0.1}\nservices:\n  eject_time: 0\n",
            "a.yaml:5",
            "services.eject_time: 0 is not a number of seconds in (0, 3600]",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel: {address: 10.0.0.1}\nservices:\n  retries: 2\n",
            "a.yaml:5",
            "services: unknown field 'retries'",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel:\n  address: 10.0.0.1\n  spread: 20000\n",
            "a.yaml:5",
            "tunnel.spread 20000 must be a port range FIRST-LAST",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel:\n  address: 10.0.0.1\n  spread: 21000-20000\n",
            "a.yaml:5",
            "ports from 1024 to 65535, the first not above the last",
        ),
        (
            "node: n1\ncgroup: /x\ntunnel:\n  address: 10.0.0.1\n  spread: 15000-16000\n",
            "a.yaml:5",
            "holds the mesh's own port 15000",
        ),
        ("node: [1\n", "a.yaml:2", "not valid YAML"),
        ("- just\n- a list\n", "a.yaml", "must be a mapping"),
    ],
)
def test_bad_config_names_file_line_and_field(text, where, msg):
    with pytest.raises(DabbaError) as e:
        config.parse(text, "a.yaml")
    assert str(e.value).startswith(where + ":"), str(e.value)
    assert msg in str(e.value)
