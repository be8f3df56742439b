"""A waypoint's Envoy bootstrap: who it is (node id namespace/name), ADS from the control plane
(mutual TLS with the waypoint's own certificate, checking the control plane's SPIFFE identity), and
the supervisor's local gRPC services on a unix socket: SDS (the waypoint's certificate, whose
key never leaves the node) and the access log stream (request telemetry)."""

from __future__ import annotations

from ..control.xds.common import ALS_CLUSTER, SDS_CLUSTER, T, h2_upstream, tls_common

ADMIN_PORT = 15000


def _local(name: str, socket_path: str) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": h2_upstream(),
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"pipe": {"path": socket_path}}}}]}]},
    }  # fmt: skip


def bootstrap(key: str, control: tuple[str, int], trust_domain: str, socket_path: str,
              admin_port: int = ADMIN_PORT) -> dict:  # fmt: skip
    host, port = control
    return {
        "node": {"id": key, "cluster": "dabba-waypoint"},
        # Envoy's own statistics: the server's, its xDS and its clusters' health only (the
        # request metrics are the access log's: telemetry.py). Every listener and cluster's full
        # set cost the waypoint memory per service and endpoint
        "stats_config": {"stats_matcher": {"inclusion_list": {"patterns": [
            {"prefix": "server."}, {"prefix": "cluster_manager."}, {"prefix": "listener_manager."},
            {"safe_regex": {"regex": r"^cluster\..*\.(outlier_detection|circuit_breakers)\..*"}},
            {"safe_regex": {"regex": r"^cluster\..*\.upstream_(rq|cx)_(total|active|pending_overflow)$"}},
        ]}}},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "bootstrap_extensions": [{"name": "envoy.bootstrap.internal_listener", "typed_config": {
            "@type": T + "extensions.bootstrap.internal_listener.v3.InternalListener"}}],
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                           "set_node_on_first_message_only": True,
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [
            {
                "name": "xds",
                "type": "STATIC" if host.replace(".", "").isdigit() or ":" in host
                        else "STRICT_DNS",
                "connect_timeout": "5s",
                "typed_extension_protocol_options": h2_upstream(),
                "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {
                        "address": host, "port_value": port}}}}]}]},
                # the waypoint's own certificate (SDS: a renewed one is used at the next
                # connection), checking the control plane's SPIFFE identity
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": T + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "common_tls_context": tls_common(
                        {"exact": f"spiffe://{trust_domain}/control"}),
                }},
            },
            _local(SDS_CLUSTER, socket_path),
            _local(ALS_CLUSTER, socket_path),
        ]},
    }  # fmt: skip
