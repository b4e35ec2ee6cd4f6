"""The complete Envoy bootstrap, assembled from the builders (``filters``, ``routes``,
``clusters``), so Envoy's config and the service's never disagree.

Layout (docs/envoy-facts.md has the why):
- listener -> HCM -> [ext_proc route stage] -> router; the route picks its cluster from the
  ``x-extproc-cluster`` header, which only the route stage can set (internal_only_headers).
- the backend pool holds every backend endpoint; the override-host LB policy takes the
  per-request endpoint order from the route stage's dynamic metadata and walks it on retries.
- the pool's upstream filter chain runs the attempt stage on every attempt, retries included.
"""

from __future__ import annotations

from typing import Any

import yaml

from ..config import Config
from .clusters import backend_clusters, egress, service_cluster
from .common import HCM_TYPE, dur, sock
from .filters import access_logs, http_filters
from .routes import local_replies, route_config

# Envoy honours some x-envoy-* request headers (timeouts, retries) and our routes trust our
# own x-extproc-* names: a client's copies are removed as the request arrives, before any
# filter or route sees them (natively, on every request; the route stage still drops any it
# is handed, for Envoys we do not render, as inside AI Gateway).
_CLIENT_INTERNAL_PREFIXES = ("x-envoy-", "x-extproc-")


def early_header_mutation() -> dict[str, Any]:
    return {"name": "envoy.http.early_header_mutation.header_mutation", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.http.early_header_mutation."
                 "header_mutation.v3.HeaderMutation",
        "mutations": [{"remove_on_match": {"key_matcher": {"prefix": p}}}
                      for p in _CLIENT_INTERNAL_PREFIXES]}}


def connection_manager(cfg: Config) -> dict[str, Any]:
    e = cfg.envoy
    return {
        "@type": HCM_TYPE,
        "stat_prefix": "llm",
        "early_header_mutation_extensions": [early_header_mutation()],
        "always_set_request_id_in_response": True,
        "request_timeout": dur(e.request_timeout_s),
        "request_headers_timeout": dur(e.request_headers_timeout_s),
        "stream_idle_timeout": dur(e.stream_idle_timeout_s),
        "local_reply_config": local_replies(cfg),
        "route_config": route_config(cfg),
        "http_filters": http_filters(cfg),
        "access_log": access_logs(cfg),
    }


def render(cfg: Config) -> dict[str, Any]:
    e = cfg.envoy
    egress_listeners, egress_clusters = egress(cfg)
    return {
        "admin": {"address": sock(e.admin_host, e.admin_port)},
        "static_resources": {
            "listeners": [*egress_listeners, {
                "name": "llm",
                "address": sock(e.listen_host, e.listen_port),
                "per_connection_buffer_limit_bytes": e.max_body_bytes,
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": connection_manager(cfg),
                }]}],
            }],
            "clusters": [service_cluster(cfg), *backend_clusters(cfg), *egress_clusters],
        },
    }


def render_yaml(cfg: Config, source: str | None = None) -> str:
    head = "# Rendered by `extproc envoy` from the service config"
    head += f" ({source}).\n" if source else ".\n"
    head += "# Do not edit by hand: change the service config and render again.\n"
    return head + yaml.safe_dump(render(cfg), sort_keys=False, width=100)
