"""Destinations the mesh never carries (agent/node/addresses.py), as the tunnel checks them."""

import pytest

from agent.node.addresses import (
    MESH_PORTS,
    hostport,
    node_addresses,
    refused_destination,
    split_hostport,
    unmapped,
)

NODE = {"10.10.0.11", "10.20.1.1", "fd00::11"}


@pytest.mark.parametrize(
    "ip,port,why",
    [
        ("0.0.0.0", 15000, "loopback or unspecified"),
        ("0.1.2.3", 80, "loopback or unspecified"),
        ("127.0.0.1", 80, "loopback or unspecified"),
        ("127.255.0.9", 80, "loopback or unspecified"),
        ("::", 80, "loopback or unspecified"),
        ("::1", 80, "loopback or unspecified"),
        ("::ffff:127.0.0.1", 80, "loopback or unspecified"),
        ("::ffff:0.0.0.0", 80, "loopback or unspecified"),
        ("10.20.2.11", 15008, "port 15008 is one of the mesh's own"),
        ("10.20.2.11", 15001, "port 15001 is one of the mesh's own"),
        ("169.254.169.254", 80, "a link-local address"),
        ("::ffff:169.254.1.1", 80, "a link-local address"),
        ("fe80::1", 80, "a link-local address"),
        ("10.10.0.11", 22, "an address of the node itself"),
        ("::ffff:10.20.1.1", 8080, "an address of the node itself"),
        ("fd00::11", 80, "an address of the node itself"),
        ("224.0.0.1", 80, "multicast or broadcast"),
        ("255.255.255.255", 80, "multicast or broadcast"),
        ("not-an-ip", 80, "'not-an-ip' is not an IP address"),
    ],
)
def test_refused_destinations_say_why(ip, port, why):
    assert refused_destination(ip, port, NODE).startswith(why)


@pytest.mark.parametrize(
    "ip,port", [("10.20.2.11", 8080), ("::ffff:10.20.2.11", 80), ("93.184.216.34", 443)]
)
def test_mesh_destinations_and_the_outside_are_not_refused(ip, port):
    assert refused_destination(ip, port, NODE) == ""


def test_mesh_ports_are_istios():
    assert MESH_PORTS == (15000, 15001, 15006, 15008)


def test_node_addresses_include_loopback_of_both_families():
    addrs = node_addresses()
    assert "127.0.0.1" in addrs and addrs == sorted(set(addrs))


@pytest.mark.parametrize(
    "text,want",
    [
        ("10.20.1.11:8080", ("10.20.1.11", 8080)),
        ("[fd00:20:1::b]:8080", ("fd00:20:1::b", 8080)),
        ("[fd00:20:1:0:0::b]:1", ("fd00:20:1::b", 1)),  # as the tunnels and the kernel print it
    ],
)
def test_host_and_port_of_both_families(text, want):
    assert split_hostport(text) == want
    assert split_hostport(hostport(*want)) == want


@pytest.mark.parametrize(
    "text",
    [
        "fd00::1:80",  # IPv6 without brackets: which colon is the port's?
        "[10.0.0.1]:80",
        "[fe80::1%eth0]:80",  # a zone names one node's link
        "web.default:80",
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "[fd00::1]",
        "10.0.0.1",
        "",
    ],
)
def test_anything_else_is_no_host_and_port(text):
    with pytest.raises(ValueError):
        split_hostport(text)


def test_a_dual_stack_sockets_ipv4_peer_is_named_as_ipv4():
    assert unmapped("::ffff:10.20.1.11") == "10.20.1.11"
    assert unmapped("fd00:20:1:0::b") == "fd00:20:1::b"
    assert unmapped("10.20.1.11") == "10.20.1.11"
