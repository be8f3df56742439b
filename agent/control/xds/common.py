"""What a waypoint's Envoy configuration and its supervisor agree on: the names of the
supervisor's local clusters (SDS, the access log stream) and of Istio's secrets, the filter
state keys of a request's source, and the TLS context whose secrets come from the supervisor.
The control plane's configuration (waypoint.py) and the supervisor's bootstrap
(agent/waypoint/bootstrap.py) both use them; this module imports nothing, as the supervisor
imports it and nothing of the control plane's.
"""

from __future__ import annotations

T = "type.googleapis.com/envoy."
SDS_CLUSTER = "sds-local"  # the supervisor's SDS, a static cluster of the bootstrap
ALS_CLUSTER = "als-local"  # the supervisor's access log service
CERT, BUNDLE = "default", "ROOTCA"  # Istio's secret names
# what the waypoint knows of a request's source, from the HBONE connection it came on: set
# at 15008, carried through the internal listeners (filter state shared transitively over
# internal_upstream), logged with each request and forwarded to the destination's tunnel
SOURCE_PRINCIPAL = "io.dabba.source_principal"  # the client's SPIFFE ID (its certificate)
SOURCE_FORWARDED = "io.dabba.source_forwarded"  # its tunnel's Forwarded: for=<address>
SOURCE_BAGGAGE = "io.dabba.source_baggage"  # its tunnel's baggage: its pod, app and version


def _sds(name: str) -> dict:
    return {"name": name, "sds_config": {"resource_api_version": "V3", "api_config_source": {
        "api_type": "GRPC", "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}]}}}  # fmt: skip


def h2_upstream() -> dict:
    """A cluster's protocol options: HTTP/2 to its endpoints (HBONE, gRPC)."""
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": T + "extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}  # fmt: skip


def tls_common(san: dict) -> dict:
    return {
        "alpn_protocols": ["h2"],
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3",
                       "tls_maximum_protocol_version": "TLSv1_3"},
        "tls_certificate_sds_secret_configs": [_sds(CERT)],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": san}]},
            "validation_context_sds_secret_config": _sds(BUNDLE),
        },
    }  # fmt: skip
