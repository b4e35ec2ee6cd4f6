"""The clusters: the backend pool and its twins (one per way of handling attempts), the
service's own, and an egress cluster (with its loopback listener) per backend by host name or
over TLS."""

from __future__ import annotations

from typing import Any

from ..config import Config, backend_endpoint, pool_addresses
from ..contract import META_NS, SERVICE_CLUSTER, Cluster, Meta
from . import fast_lane
from .common import HCM_TYPE, PROTOCOL_OPTIONS, ROUTER, dur, sock
from .filters import attempt_stage, upstream_filters


def circuit_breakers(cfg: Config) -> dict[str, Any]:
    """Sized so that failover is never refused under load (Envoy's default allows three retries
    in flight per cluster); the budget bounds retries by the requests in flight instead."""
    e = cfg.envoy
    return {"thresholds": [{
        "priority": "DEFAULT",
        "max_connections": e.max_connections,
        "max_pending_requests": e.max_pending_requests,
        "max_requests": e.max_requests,
        "retry_budget": {"budget_percent": {"value": e.retry_budget_percent},
                         "min_retry_concurrency": e.min_retry_concurrency},
    }]}


def backend_clusters(cfg: Config) -> list[dict[str, Any]]:
    """The pool (the attempt stage on every attempt), and its twins for requests the route
    stage prepared whole: without the attempt stage, and with its response side only. All
    take the per-request endpoint order from the route stage's metadata (override-host LB)."""
    e = cfg.envoy
    endpoints = []
    for b in cfg.backends:
        host, port = pool_addresses(cfg)[b.name].rsplit(":", 1)
        endpoints.append({
            "endpoint": {"address": sock(host, int(port))},
            "metadata": {"filter_metadata": {"llm": {"backend": b.name}}},
        })
    pool = {
        "name": Cluster.POOL.value,
        "type": "STATIC",
        "connect_timeout": dur(e.connect_timeout_s),
        "per_connection_buffer_limit_bytes": e.max_body_bytes,
        "circuit_breakers": circuit_breakers(cfg),
        "load_assignment": {"cluster_name": Cluster.POOL.value,
                            "endpoints": [{"lb_endpoints": endpoints}]},
        "load_balancing_policy": {"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.override_host",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies"
                ".override_host.v3.OverrideHost",
                "override_host_sources": [{"metadata": {
                    "key": META_NS, "path": [{"key": Meta.HOSTS.value}]}}],
                "fallback_policy": {"policies": [{"typed_extension_config": {
                    "name": "envoy.load_balancing_policies.round_robin",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies"
                        ".round_robin.v3.RoundRobin"},
                }}]},
            },
        }}]},
        "typed_extension_protocol_options": upstream_filters(attempt_stage(cfg)),
    }
    clusters = [pool]
    if e.direct_cluster:
        for name, options in (
                (Cluster.DIRECT, upstream_filters(None)),
                (Cluster.JUDGED, upstream_filters(attempt_stage(cfg, judged_only=True))),
                # (the compiled lane strips a backend's copies of our headers itself)
                *([(Cluster.FAST, upstream_filters(None, strip=False))]
                  if fast_lane.compiled(cfg) else [])):
            clusters.append({**pool, "name": name.value,
                             "typed_extension_protocol_options": options,
                             "load_assignment": {**pool["load_assignment"],
                                                 "cluster_name": name.value}})
    return clusters


def service_cluster(cfg: Config) -> dict[str, Any]:
    """The service, over HTTP/2, one endpoint per worker (its Unix socket when it has one)."""
    e = cfg.envoy
    host = e.service_host or cfg.service.host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return {
        "name": SERVICE_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        # Multi-MB bodies share this HTTP/2 connection. With the default 1 MiB buffer limit its
        # watermark fires under concurrent large bodies and Envoy 1.40 segfaults in the upstream
        # (attempt-stage) ext_proc filter; measured: 4 MB bodies at concurrency 2+ crash it.
        "per_connection_buffer_limit_bytes": 4 * e.max_body_bytes,
        # Each client request holds up to two streams here (route and attempt stages).
        "circuit_breakers": circuit_breakers(cfg),
        "load_assignment": {"cluster_name": SERVICE_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": sock(host, cfg.service.port + i) if path is None
                          else {"pipe": {"path": path}}}}
            for i, path in ((i, cfg.service.socket_path(i))
                            for i in range(cfg.service.workers))]}]},
        "typed_extension_protocol_options": {PROTOCOL_OPTIONS: {
            "@type": f"type.googleapis.com/{PROTOCOL_OPTIONS}",
            "explicit_http_config": {"http2_protocol_options": {}},
        }},
    }


def egress(cfg: Config) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A loopback listener per backend reached by host name or over TLS: the pool's endpoint
    for it (an IP:port, as the per-request order needs) forwards to a DNS cluster that
    verifies the backend's certificate and sends its host name (SNI and Host)."""
    e, listeners, clusters = cfg.envoy, [], []
    for b in cfg.backends:
        ep = backend_endpoint(b.url)
        if not ep.needs_egress:
            continue
        name = f"egress_{b.name}"
        port = int(pool_addresses(cfg)[b.name].rsplit(":", 1)[1])
        cluster: dict[str, Any] = {
            "name": name,
            "type": "LOGICAL_DNS",
            "dns_lookup_family": "V4_PREFERRED",
            "connect_timeout": dur(e.connect_timeout_s),
            "per_connection_buffer_limit_bytes": e.max_body_bytes,
            "circuit_breakers": circuit_breakers(cfg),
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": sock(ep.hostname, ep.port)}}]}]},
        }
        if ep.scheme == "https":
            cluster["transport_socket"] = {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                             "UpstreamTlsContext",
                    "sni": ep.hostname,
                    "common_tls_context": {"validation_context": {
                        "trusted_ca": {"filename": b.tls_ca_file or e.ca_bundle},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": ep.hostname}}],
                    }},
                },
            }
        clusters.append(cluster)
        listeners.append({
            "name": name,
            "address": sock("127.0.0.1", port),
            "per_connection_buffer_limit_bytes": e.max_body_bytes,
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": HCM_TYPE,
                    "stat_prefix": name,
                    "local_reply_config": {"body_format": {
                        "json_format": {"error": {
                            "message": f"backend '{b.name}' ({ep.hostname}) failed: "
                                       "%LOCAL_REPLY_BODY%",
                            "type": "upstream_error", "code": "%RESPONSE_CODE_DETAILS%",
                            "backend": b.name}},
                        "content_type": "application/json"}},
                    "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"],
                                                        "routes": [{
                        "match": {"prefix": "/"},
                        "route": {"cluster": name, "timeout": dur(e.route_timeout_s),
                                  "auto_host_rewrite": True}}]}]},
                    "http_filters": [ROUTER],
                }}]}],
        })
    return listeners, clusters
